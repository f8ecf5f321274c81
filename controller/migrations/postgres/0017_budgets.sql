-- What a run's and a step's attempts reported in cost (millionths of a dollar) and
-- tokens, and a run's budget as raised at a release (NULL: its spec's).
ALTER TABLE runs ADD COLUMN cost_micros BIGINT NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN tokens BIGINT NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN budget_micros BIGINT;
ALTER TABLE runs ADD COLUMN budget_tokens BIGINT;
ALTER TABLE steps ADD COLUMN cost_micros BIGINT NOT NULL DEFAULT 0;
ALTER TABLE steps ADD COLUMN tokens BIGINT NOT NULL DEFAULT 0;
