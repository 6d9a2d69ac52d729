"""Cuneiform service plumbing: one way for every service to configure, log, measure, store,
migrate, consume and shut down. Importable, never run."""
