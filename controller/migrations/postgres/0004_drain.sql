-- Agents an operator drained take no new work until undrained.
ALTER TABLE agents ADD COLUMN draining BIGINT NOT NULL DEFAULT 0;
