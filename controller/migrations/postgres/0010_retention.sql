-- Retention: a workstream may keep its finished runs for a time of its own, and the
-- pruner finds finished runs by when they finished.
ALTER TABLE runs ADD COLUMN retain_ms BIGINT;
CREATE INDEX runs_finished ON runs (finished_at) WHERE finished_at IS NOT NULL;
