-- Finding earlier runs of a workstream (for ETAs from observed durations).
CREATE INDEX runs_workstream ON runs (workstream, created_at);
