-- The archiver's own tables (schema "archiver"). The archive itself lives in the object store; these
-- rows are the index operators and the admin page list.

-- Every dataset exported (its files and manifest are under datasets/<dataset_id>/ in the bucket).
CREATE TABLE datasets (
    dataset_id           uuid PRIMARY KEY,
    batch_id             uuid UNIQUE,
    created_at           timestamptz NOT NULL,
    exported_at          timestamptz NOT NULL DEFAULT now(),
    prefix               text NOT NULL,
    manifest_key         text NOT NULL,
    manifest_sha256      text NOT NULL,
    trajectory_count     integer NOT NULL,
    group_count          integer NOT NULL,
    excluded_group_count integer NOT NULL,
    files                jsonb NOT NULL,
    selection            jsonb NOT NULL
);

-- What each retention run removed from the recorder's tables, and on what proof.
CREATE TABLE retention_runs (
    run_id                 uuid PRIMARY KEY,
    ran_at                 timestamptz NOT NULL DEFAULT now(),
    cutoff                 timestamptz NOT NULL,
    archived_through       bigint NOT NULL,
    trajectories_deleted   integer NOT NULL,
    events_deleted         integer NOT NULL,
    trajectories_kept_unarchived integer NOT NULL
);
