-- Runs carry a display name and labels; steps keep what reads need of the spec (the
-- steps they need, their kind) and the route decided at submit; each event keeps the
-- run's step counts right after it.
ALTER TABLE runs ADD COLUMN name TEXT NOT NULL DEFAULT '';
ALTER TABLE runs ADD COLUMN labels TEXT NOT NULL DEFAULT '{}';
ALTER TABLE steps ADD COLUMN needs TEXT NOT NULL DEFAULT '[]';
ALTER TABLE steps ADD COLUMN kind TEXT NOT NULL DEFAULT '';
ALTER TABLE steps ADD COLUMN route TEXT NOT NULL DEFAULT '';
ALTER TABLE run_events ADD COLUMN steps_done BIGINT NOT NULL DEFAULT 0;
ALTER TABLE run_events ADD COLUMN steps_total BIGINT NOT NULL DEFAULT 0;
UPDATE steps SET
    needs = COALESCE((SELECT (r.spec::json -> 'steps' -> steps.idx::int -> 'needs')::text FROM runs r WHERE r.id = steps.run_id), '[]'),
    kind = COALESCE((SELECT r.spec::json -> 'steps' -> steps.idx::int ->> 'kind' FROM runs r WHERE r.id = steps.run_id), '');
