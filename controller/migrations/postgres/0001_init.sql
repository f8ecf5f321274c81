-- Baton's run state. Times are Unix milliseconds; JSON is stored as TEXT.

CREATE TABLE runs (
    id          TEXT PRIMARY KEY,
    workstream  TEXT NOT NULL,
    state       TEXT NOT NULL,
    spec        TEXT NOT NULL,
    params      TEXT NOT NULL,
    reason      TEXT NOT NULL DEFAULT '',
    created_at  BIGINT NOT NULL,
    started_at  BIGINT,
    finished_at BIGINT
);
CREATE INDEX runs_state ON runs (state);
CREATE INDEX runs_created ON runs (created_at);

CREATE TABLE steps (
    run_id          TEXT NOT NULL REFERENCES runs (id),
    step_id         TEXT NOT NULL,
    idx             BIGINT NOT NULL,
    state           TEXT NOT NULL,
    tool            TEXT NOT NULL,
    attempts        BIGINT NOT NULL,
    lost_count      BIGINT NOT NULL,
    next_attempt_at BIGINT,
    started_at      BIGINT,
    finished_at     BIGINT,
    reason          TEXT NOT NULL,
    result          TEXT,
    PRIMARY KEY (run_id, step_id)
);

CREATE TABLE step_attempts (
    id          TEXT PRIMARY KEY,
    run_id      TEXT NOT NULL REFERENCES runs (id),
    step_id     TEXT NOT NULL,
    number      BIGINT NOT NULL,
    agent_id    TEXT NOT NULL,
    agent_name  TEXT NOT NULL,
    lease_token TEXT NOT NULL,
    state       TEXT NOT NULL,
    exit_code   BIGINT,
    error_class TEXT NOT NULL,
    error       TEXT NOT NULL,
    result      TEXT,
    output_tail TEXT NOT NULL,
    assigned_at BIGINT NOT NULL,
    started_at  BIGINT,
    finished_at BIGINT,
    deadline_at BIGINT
);
CREATE INDEX step_attempts_run ON step_attempts (run_id, step_id, number);

-- Append-only audit trail; seq is gapless per run.
CREATE TABLE run_events (
    run_id        TEXT NOT NULL REFERENCES runs (id),
    seq           BIGINT NOT NULL,
    at            BIGINT NOT NULL,
    kind          TEXT NOT NULL,
    step_id       TEXT NOT NULL,
    attempt_id    TEXT NOT NULL,
    run_state     TEXT NOT NULL,
    step_state    TEXT NOT NULL,
    attempt_state TEXT NOT NULL,
    message       TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
);

CREATE TABLE agents (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    version      TEXT NOT NULL,
    labels       TEXT NOT NULL,
    tools        TEXT NOT NULL,
    slots        BIGINT NOT NULL,
    state        TEXT NOT NULL,
    connected_at BIGINT NOT NULL,
    last_seen_at BIGINT NOT NULL
);
