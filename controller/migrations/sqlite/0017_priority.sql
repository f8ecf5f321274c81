-- Higher first when agents' slots are scarce (SubmitRunRequest.priority).
ALTER TABLE runs ADD COLUMN priority BIGINT NOT NULL DEFAULT 0;
