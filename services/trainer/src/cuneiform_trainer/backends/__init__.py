"""Training backends: each turns a verified dataset into a model artifact."""
