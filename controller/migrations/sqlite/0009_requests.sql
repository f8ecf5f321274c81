-- The request id of the submit that created each run: a submit retried with the same
-- id answers with that run instead of creating another.
ALTER TABLE runs ADD COLUMN request_id TEXT NOT NULL DEFAULT '';
CREATE INDEX runs_by_request_id ON runs (request_id) WHERE request_id <> '';
