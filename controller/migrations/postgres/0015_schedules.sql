-- Workstreams started at the times of a cron expression or an interval, by the leader.
-- next_at is the earliest scheduled time not handled yet; each time's run has the
-- request id schedule:ID:TIME, so a time is never started twice.
CREATE TABLE schedules (
    id TEXT PRIMARY KEY,
    workstream TEXT NOT NULL,
    spec TEXT NOT NULL,
    params TEXT NOT NULL,
    cron TEXT NOT NULL,
    every_ms BIGINT,
    timezone TEXT NOT NULL,
    overlap TEXT NOT NULL,
    catchup TEXT NOT NULL,
    paused BIGINT NOT NULL DEFAULT 0,
    next_at BIGINT NOT NULL,
    last_run_id TEXT NOT NULL DEFAULT '',
    created_at BIGINT NOT NULL,
    created_by TEXT NOT NULL
);
CREATE INDEX schedules_due ON schedules (next_at) WHERE paused = 0;
