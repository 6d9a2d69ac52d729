-- Completeness counts distinct positions, not distinct ids: a producer that re-sends an event under a
-- new event_id (same trajectory, same seq) must not make a trajectory with a gap look complete. The
-- ledger insert's ON CONFLICT DO NOTHING now drops such a copy as a duplicate.
DROP INDEX events_trajectory;
CREATE UNIQUE INDEX events_trajectory_seq ON events (trajectory_id, seq);
