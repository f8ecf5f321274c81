-- Own failures counted against the retry budget (reset when a quarantined run is
-- released), and circuit breakers.
ALTER TABLE steps ADD COLUMN failures BIGINT NOT NULL DEFAULT 0;

CREATE TABLE breakers (
    tool        TEXT NOT NULL,
    -- '' for the breaker of the tool as a whole
    agent_id    TEXT NOT NULL,
    state       TEXT NOT NULL,
    consecutive BIGINT NOT NULL,
    opened_at   BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    PRIMARY KEY (tool, agent_id)
);
