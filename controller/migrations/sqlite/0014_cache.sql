-- Results of steps with `cache:`, by key, until they expire.
CREATE TABLE step_cache (
    cache_key TEXT PRIMARY KEY,
    workstream TEXT NOT NULL,
    step_id TEXT NOT NULL,
    run_id TEXT NOT NULL,
    result TEXT,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
-- A run submitted with --no-cache runs every step (1), whatever the cache holds.
ALTER TABLE runs ADD COLUMN no_cache BIGINT NOT NULL DEFAULT 0;
