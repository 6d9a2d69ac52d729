-- The trainer-dispatcher's tables (schema "trainer_dispatcher"): each batch's training life, every
-- attempt, every rejected (stale or bad) report, and the model registry.

CREATE TABLE batches (
    batch_id          uuid PRIMARY KEY,
    dataset_id        uuid NOT NULL,
    manifest_key      text NOT NULL,
    -- offered → claimed → completed, or failed after max_attempts.
    state             text NOT NULL CHECK (state IN ('offered', 'claimed', 'completed', 'failed')),
    -- The live attempt: reports with another number are rejected (fencing).
    attempt           integer NOT NULL,
    trainer_id        text,
    offered_at        timestamptz NOT NULL DEFAULT now(),
    claimed_at        timestamptz,
    last_report_at    timestamptz,
    progress          jsonb,
    reason            text,
    model_version     text,
    -- Set once the live attempt's offer is in the BATCHES stream (the sweep publishes the rest).
    offer_published_at timestamptz,
    updated_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX batches_live ON batches (last_report_at) WHERE state = 'claimed';

CREATE TABLE attempts (
    batch_id    uuid NOT NULL REFERENCES batches (batch_id),
    attempt     integer NOT NULL,
    trainer_id  text,
    outcome     text NOT NULL,  -- completed, failed, timed_out, rejected_artifact
    reason      text,
    ended_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (batch_id, attempt)
);

CREATE TABLE rejected_reports (
    event_id    uuid PRIMARY KEY,
    batch_id    uuid NOT NULL,
    attempt     integer NOT NULL,
    trainer_id  text NOT NULL,
    kind        text NOT NULL,
    reason      text NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);

-- The model registry: every trained version with its lineage.
CREATE TABLE models (
    model_name      text NOT NULL,
    model_version   text NOT NULL,
    batch_id        uuid UNIQUE,
    dataset_id      uuid,
    base_model      text NOT NULL,
    bucket          text NOT NULL,
    artifact_key    text NOT NULL,
    artifact_sha256 text NOT NULL,
    artifact_size   bigint NOT NULL,
    metrics         jsonb NOT NULL,
    trainer_id      text,
    attempt         integer,
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- Set once pipeline.model.trained is in the stream.
    published_at    timestamptz,
    PRIMARY KEY (model_name, model_version)
);
