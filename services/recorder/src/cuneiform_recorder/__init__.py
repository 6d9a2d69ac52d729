"""The recorder: every agent event stored once in PostgreSQL, trajectories proven complete."""
