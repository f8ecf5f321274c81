-- Agents an operator drained take no new work until undrained.
ALTER TABLE agents ADD COLUMN draining INTEGER NOT NULL DEFAULT 0;
