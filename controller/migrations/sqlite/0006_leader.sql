-- Which controller leads (used with Postgres, where several controllers share the
-- database), and the leader epoch each event was written under.
CREATE TABLE leader (
    id          INTEGER PRIMARY KEY,
    epoch       INTEGER NOT NULL,
    holder      TEXT NOT NULL,
    address     TEXT NOT NULL,
    lease_until INTEGER NOT NULL
);
INSERT INTO leader (id, epoch, holder, address, lease_until) VALUES (1, 0, '', '', 0);
ALTER TABLE run_events ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0;
