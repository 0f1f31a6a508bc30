"""minibatch-harness: the lecture note's DNN as an instrument for studying batch size."""

import os

__version__ = "0.1.0"

# MLflow logs its store's schema set-up and the like at INFO in every process that opens a store (each
# torchrun rank, each Ray worker): warnings and errors only, unless the user chose a level.
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
