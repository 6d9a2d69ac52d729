-- Readiness (schema "readiness"): the batches it froze and which trajectories are in them.

CREATE TABLE batches (
    batch_id        uuid PRIMARY KEY,
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- readiness (the rules passed), or who asked: "cli:<user>", "admin:<user>".
    triggered_by    text NOT NULL,
    reason          text NOT NULL,
    forced          boolean NOT NULL DEFAULT false,
    -- The verdict and the numbers behind every rule when the batch was made.
    verdict         jsonb NOT NULL,
    trajectory_count integer NOT NULL,
    group_count     integer NOT NULL,
    -- created → released (its trajectories free again, e.g. the training failed).
    status          text NOT NULL DEFAULT 'created' CHECK (status IN ('created', 'released')),
    released_at     timestamptz,
    release_reason  text,
    -- Set once pipeline.batch.created is in the stream; the sweep publishes batches left without it.
    published_at    timestamptz
);
CREATE INDEX batches_unpublished ON batches (created_at) WHERE published_at IS NULL;

-- Frozen membership: a trajectory is in at most one live batch.
CREATE TABLE batch_trajectories (
    trajectory_id uuid PRIMARY KEY,
    batch_id      uuid NOT NULL REFERENCES batches (batch_id),
    scenario_id   text
);
CREATE INDEX batch_trajectories_batch ON batch_trajectories (batch_id);
