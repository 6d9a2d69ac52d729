"""Cuneiform readiness: the training-readiness rules and frozen training batches."""
