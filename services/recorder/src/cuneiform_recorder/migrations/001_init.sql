-- The recorder's tables (schema "recorder"). Every event is stored exactly once: its producer-made
-- event_id is the primary key of the ledger, and only events new to the ledger reach the typed tables.

-- One row per trajectory: what started it, how it ended, and whether every event has arrived.
CREATE TABLE trajectories (
    trajectory_id          uuid PRIMARY KEY,
    agent_id               text NOT NULL,
    scenario_id            text,
    episode_id             text,
    model_name             text,
    model_version          text,
    deployment_id          text,
    variant                text,
    environment            jsonb,
    metadata               jsonb,
    started_at             timestamptz,
    ended_at               timestamptz,
    -- What the producer said in trajectory_ended: completed, failed or aborted.
    end_status             text,
    total_reward           double precision,
    metrics                jsonb,
    final_environment      jsonb,
    error                  text,
    -- event_count from trajectory_ended: how many distinct events prove the trajectory complete.
    expected_events        integer,
    stored_events          integer NOT NULL DEFAULT 0,
    -- recording until finalized; then the producer's end status when complete, or incomplete /
    -- abandoned when the grace periods ran out first.
    status                 text NOT NULL DEFAULT 'recording'
        CHECK (status IN ('recording', 'completed', 'failed', 'aborted', 'incomplete', 'abandoned')),
    first_seen_at          timestamptz NOT NULL DEFAULT now(),
    last_event_at          timestamptz NOT NULL DEFAULT now(),
    finalized_at           timestamptz,
    completion_published_at timestamptz
);
CREATE INDEX trajectories_recording ON trajectories (last_event_at) WHERE status = 'recording';
CREATE INDEX trajectories_unpublished ON trajectories (finalized_at)
    WHERE finalized_at IS NOT NULL AND completion_published_at IS NULL;
CREATE INDEX trajectories_scenario ON trajectories (scenario_id, status);
CREATE INDEX trajectories_agent ON trajectories (agent_id);
CREATE INDEX trajectories_model ON trajectories (model_name, model_version);

-- The ledger: every distinct event of every trajectory (completeness is counted here).
CREATE TABLE events (
    event_id      uuid PRIMARY KEY,
    trajectory_id uuid NOT NULL,
    seq           integer NOT NULL,
    type          text NOT NULL,
    occurred_at   timestamptz NOT NULL,
    received_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX events_trajectory ON events (trajectory_id, seq);

CREATE TABLE steps (
    event_id      uuid PRIMARY KEY,
    trajectory_id uuid NOT NULL,
    seq           integer NOT NULL,
    step          integer NOT NULL,
    occurred_at   timestamptz NOT NULL,
    environment   jsonb,
    observation   jsonb,
    extra         jsonb
);
CREATE INDEX steps_trajectory ON steps (trajectory_id, step);

-- LLM calls in chat form whichever form the agent sent (messages + the assistant's response).
CREATE TABLE llm_calls (
    event_id          uuid PRIMARY KEY,
    trajectory_id     uuid NOT NULL,
    seq               integer NOT NULL,
    step              integer NOT NULL,
    call_id           text NOT NULL,
    occurred_at       timestamptz NOT NULL,
    model             text NOT NULL,
    purpose           text NOT NULL,
    messages          jsonb NOT NULL,
    tools             jsonb,
    response          jsonb NOT NULL,
    reasoning         text,
    params            jsonb,
    prompt_tokens     integer,
    completion_tokens integer,
    latency_ms        double precision,
    logprobs          jsonb,
    extra             jsonb
);
CREATE INDEX llm_calls_trajectory ON llm_calls (trajectory_id, step, seq);

CREATE TABLE provider_accesses (
    event_id      uuid PRIMARY KEY,
    trajectory_id uuid NOT NULL,
    seq           integer NOT NULL,
    step          integer NOT NULL,
    occurred_at   timestamptz NOT NULL,
    provider      text NOT NULL,
    provider_id   text,
    query         jsonb,
    data          jsonb,
    purpose       text,
    extra         jsonb
);
CREATE INDEX provider_accesses_trajectory ON provider_accesses (trajectory_id, step);

CREATE TABLE actions (
    event_id      uuid PRIMARY KEY,
    trajectory_id uuid NOT NULL,
    seq           integer NOT NULL,
    step          integer NOT NULL,
    occurred_at   timestamptz NOT NULL,
    action_type   text NOT NULL,
    parameters    jsonb,
    success       boolean NOT NULL,
    result        jsonb,
    error         text,
    llm_call_id   text,
    reward        double precision,
    extra         jsonb
);
CREATE INDEX actions_trajectory ON actions (trajectory_id, step);

-- Rewards for a step, or for the whole trajectory when step is null.
CREATE TABLE rewards (
    event_id      uuid PRIMARY KEY,
    trajectory_id uuid NOT NULL,
    seq           integer NOT NULL,
    step          integer,
    occurred_at   timestamptz NOT NULL,
    source        text NOT NULL,
    name          text NOT NULL,
    value         double precision NOT NULL,
    reason        text,
    extra         jsonb
);
CREATE INDEX rewards_trajectory ON rewards (trajectory_id);

-- What could never be stored, why, and the exact bytes (also on the DLQ stream).
CREATE TABLE dead_letters (
    dead_letter_id uuid PRIMARY KEY,
    consumer       text NOT NULL,
    kind           text NOT NULL,
    reason         text NOT NULL,
    subject        text NOT NULL,
    stream_seq     bigint,
    msg_id         text,
    headers        jsonb,
    payload        bytea NOT NULL,
    failed_at      timestamptz NOT NULL
);
CREATE INDEX dead_letters_failed_at ON dead_letters (failed_at);
