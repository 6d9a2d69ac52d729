"""Cuneiform reference trainer: what a GPU host runs to train on batch.ready offers."""
