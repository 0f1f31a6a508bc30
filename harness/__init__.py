"""minibatch-harness: the lecture note's DNN as an instrument for studying batch size."""

__version__ = "0.1.0"
