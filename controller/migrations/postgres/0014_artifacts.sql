-- Files steps left (`artifacts:`), kept by the controller's artifact store under
-- runs/RUN/STEP/PATH; a later success of the same step replaces its rows.
CREATE TABLE artifacts (
    run_id TEXT NOT NULL,
    step_id TEXT NOT NULL,
    path TEXT NOT NULL,
    attempt_id TEXT NOT NULL,
    size BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (run_id, step_id, path)
);
