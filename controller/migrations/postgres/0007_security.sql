-- Who caused each event (API calls), API tokens, agent enrollment and secrets.
ALTER TABLE run_events ADD COLUMN actor TEXT NOT NULL DEFAULT '';

-- API tokens; only a SHA-256 of each token's secret part is kept.
CREATE TABLE api_tokens (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    role        TEXT NOT NULL,
    secret_hash TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    created_by  TEXT NOT NULL,
    expires_at  BIGINT,
    revoked_at  BIGINT
);

-- Short-lived tokens an agent trades once for a credential of its own.
CREATE TABLE join_tokens (
    id          TEXT PRIMARY KEY,
    secret_hash TEXT NOT NULL,
    labels      TEXT NOT NULL,
    uses        BIGINT NOT NULL,
    used        BIGINT NOT NULL,
    created_at  BIGINT NOT NULL,
    created_by  TEXT NOT NULL,
    expires_at  BIGINT NOT NULL
);

-- Enrolled agents (by name) and revoked agent names. An agent with a certificate
-- has a row only once revoked.
CREATE TABLE agent_credentials (
    name        TEXT PRIMARY KEY,
    agent_id    TEXT NOT NULL,
    cred_id     TEXT,
    secret_hash TEXT,
    labels      TEXT NOT NULL,
    join_token  TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    revoked_at  BIGINT,
    revoked_by  TEXT NOT NULL DEFAULT ''
);
CREATE UNIQUE INDEX agent_credentials_cred ON agent_credentials (cred_id);

-- Secrets, sealed with the controller's key (XChaCha20-Poly1305, base64).
CREATE TABLE secrets (
    name       TEXT PRIMARY KEY,
    sealed     TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    updated_by TEXT NOT NULL
);
