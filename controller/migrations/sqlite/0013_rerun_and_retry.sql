-- A run made by a rerun names the run it repeats (empty for a submitted one); the
-- reruns of a run are found through the index.
ALTER TABLE runs ADD COLUMN rerun_of TEXT NOT NULL DEFAULT '';
CREATE INDEX runs_rerun_of ON runs (rerun_of) WHERE rerun_of <> '';
-- When a run's deadline fails it: counted from its submit, and again from a retry.
ALTER TABLE runs ADD COLUMN deadline_at BIGINT;
