"""The compression pipeline library: models, data, methods, training, evaluation, artifacts. Imports no Luigi."""
