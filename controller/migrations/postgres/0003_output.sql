-- Attempt output as streamed by agents, capped per attempt; `seq` orders the chunks.
CREATE TABLE attempt_output (
    attempt_id TEXT NOT NULL,
    seq        BIGINT NOT NULL,
    data       BYTEA NOT NULL,
    PRIMARY KEY (attempt_id, seq)
);
