-- Which controller leads (used with Postgres, where several controllers share the
-- database), and the leader epoch each event was written under.
CREATE TABLE leader (
    id          BIGINT PRIMARY KEY,
    epoch       BIGINT NOT NULL,
    holder      TEXT NOT NULL,
    address     TEXT NOT NULL,
    lease_until BIGINT NOT NULL
);
INSERT INTO leader (id, epoch, holder, address, lease_until) VALUES (1, 0, '', '', 0);
ALTER TABLE run_events ADD COLUMN epoch BIGINT NOT NULL DEFAULT 0;
