-- Own failures counted against the retry budget (reset when a quarantined run is
-- released), and circuit breakers.
ALTER TABLE steps ADD COLUMN failures INTEGER NOT NULL DEFAULT 0;

CREATE TABLE breakers (
    tool        TEXT NOT NULL,
    -- '' for the breaker of the tool as a whole
    agent_id    TEXT NOT NULL,
    state       TEXT NOT NULL,
    consecutive INTEGER NOT NULL,
    opened_at   INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (tool, agent_id)
);
