"""Models and data sets of the user's own, as the harness takes them: model.factory and data.factory."""
