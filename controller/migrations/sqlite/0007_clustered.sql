-- Steps and events are written on every transition and looked up by their primary
-- key only: stored clustered on it (WITHOUT ROWID), each insert updates one b-tree
-- instead of a table and its key index.

CREATE TABLE steps_clustered (
    run_id          TEXT NOT NULL REFERENCES runs (id),
    step_id         TEXT NOT NULL,
    idx             INTEGER NOT NULL,
    state           TEXT NOT NULL,
    tool            TEXT NOT NULL,
    attempts        INTEGER NOT NULL,
    lost_count      INTEGER NOT NULL,
    next_attempt_at INTEGER,
    started_at      INTEGER,
    finished_at     INTEGER,
    reason          TEXT NOT NULL,
    result          TEXT,
    failures        INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (run_id, step_id)
) WITHOUT ROWID;
INSERT INTO steps_clustered
    SELECT run_id, step_id, idx, state, tool, attempts, lost_count, next_attempt_at,
           started_at, finished_at, reason, result, failures
    FROM steps;
DROP TABLE steps;
ALTER TABLE steps_clustered RENAME TO steps;

CREATE TABLE run_events_clustered (
    run_id        TEXT NOT NULL REFERENCES runs (id),
    seq           INTEGER NOT NULL,
    at            INTEGER NOT NULL,
    kind          TEXT NOT NULL,
    step_id       TEXT NOT NULL,
    attempt_id    TEXT NOT NULL,
    run_state     TEXT NOT NULL,
    step_state    TEXT NOT NULL,
    attempt_state TEXT NOT NULL,
    message       TEXT NOT NULL,
    epoch         INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;
INSERT INTO run_events_clustered
    SELECT run_id, seq, at, kind, step_id, attempt_id, run_state, step_state,
           attempt_state, message, epoch
    FROM run_events;
DROP TABLE run_events;
ALTER TABLE run_events_clustered RENAME TO run_events;
