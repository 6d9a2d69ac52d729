-- Deployer (schema "deployer"): the model registry, experiments (deployments), the routing tables it
-- wrote to the NATS KV bucket "routing", and the history of every change.

-- Every model version that can be deployed: trained (from pipeline.model.trained) or uploaded by hand.
CREATE TABLE models (
    model_name      text NOT NULL,
    model_version   text NOT NULL,
    source          text NOT NULL CHECK (source IN ('trained', 'manual')),
    -- Lineage of a trained version: the batch, its dataset, the trajectories in it, the base model.
    batch_id        uuid,
    dataset_id      uuid,
    trajectory_ids  uuid[] NOT NULL DEFAULT '{}',
    base_model      text,
    bucket          text NOT NULL,
    artifact_key    text NOT NULL,
    artifact_sha256 text NOT NULL,
    artifact_size   bigint NOT NULL,
    metrics         jsonb NOT NULL DEFAULT '{}',
    trainer_id      text,
    attempt         integer,
    -- trainer-dispatcher (trained), or operator:<who> (manual); and why.
    registered_by   text NOT NULL,
    reason          text NOT NULL DEFAULT '',
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model_name, model_version)
);

-- One routing configuration of a model: immediate (one version), canary or A/B (an experiment).
CREATE TABLE deployments (
    deployment_id   uuid PRIMARY KEY,
    model_name      text NOT NULL,
    strategy        text NOT NULL CHECK (strategy IN ('immediate', 'canary', 'ab')),
    -- [{"version", "weight", "role": champion|challenger}], challengers first (see the SDK's routing).
    arms            jsonb NOT NULL,
    champion        text NOT NULL,
    -- active → promoted | rolled_back (an experiment decided) | superseded (another deployment replaced it).
    status          text NOT NULL DEFAULT 'active'
        CHECK (status IN ('active', 'promoted', 'rolled_back', 'superseded')),
    created_by      text NOT NULL,
    reason          text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    decided_at      timestamptz,
    -- The verdict and numbers that ended it.
    decision        jsonb
);
CREATE INDEX deployments_active ON deployments (model_name) WHERE status = 'active';

-- The current routing table of each model, as written (or to be written) to the KV bucket.
CREATE TABLE routing (
    model_name      text PRIMARY KEY,
    revision        bigint NOT NULL,
    deployment_id   uuid NOT NULL REFERENCES deployments,
    pins            jsonb NOT NULL DEFAULT '{}',
    routing         jsonb NOT NULL,
    -- The revision known to be in the KV bucket; the sweep writes when it lags.
    written_revision bigint NOT NULL DEFAULT 0,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- Every change, in order; each is announced on pipeline.deployment.changed (event id = event_id).
CREATE TABLE history (
    seq             bigserial PRIMARY KEY,
    event_id        uuid NOT NULL UNIQUE,
    model_name      text NOT NULL,
    deployment_id   uuid NOT NULL,
    action          text NOT NULL,
    actor           text NOT NULL,
    reason          text NOT NULL,
    revision        bigint NOT NULL,
    strategy        text NOT NULL,
    previous        jsonb NOT NULL,
    current         jsonb NOT NULL,
    routing         jsonb NOT NULL,
    evaluation      jsonb,
    at              timestamptz NOT NULL DEFAULT now(),
    published_at    timestamptz
);
CREATE INDEX history_unpublished ON history (seq) WHERE published_at IS NULL;
