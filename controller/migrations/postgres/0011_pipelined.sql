-- A pipelined attempt is assigned to start on its agent after upstream attempts there
-- succeed: it records which (a JSON list of attempt ids; empty for an ordinary one).
ALTER TABLE step_attempts ADD COLUMN follows TEXT NOT NULL DEFAULT '';
