-- Where each event sat in the TRAJECTORIES stream. The archiver's segments are keyed by stream
-- sequence ranges, so retention can prove that every event of a trajectory is archived before its
-- rows leave PostgreSQL. NULL (events stored before this column existed) counts as not proven.
ALTER TABLE events ADD COLUMN stream_seq bigint;
