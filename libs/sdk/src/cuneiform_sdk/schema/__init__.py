"""The generated JSON Schema of the public contract (``events.v1.schema.json``)."""
