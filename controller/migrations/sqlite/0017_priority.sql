-- Higher first when agents' slots are scarce (SubmitRunRequest.priority).
ALTER TABLE runs ADD COLUMN priority BIGINT NOT NULL DEFAULT 0;
-- 1: the run waits for a slot of its workstream's concurrency key.
ALTER TABLE runs ADD COLUMN queued BIGINT NOT NULL DEFAULT 0;
