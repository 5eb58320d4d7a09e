-- geste schema, version 15 (SQLite): continue-as-new (issue 16). ctx.continue_as_new(...) ends the run of
-- an instance and starts another under the same id, with new input and an empty history. In the same
-- transaction the run's history rows move to geste_run_history and its summary goes to geste_runs; the
-- current run's rows stay in geste_history, so nothing that reads the history changes (docs/design.md,
-- "Continue as new"). run: the number of the instance's current run (1 for an instance never continued);
-- run_started_at: when it started (NULL: its created_at).
ALTER TABLE geste_instances ADD COLUMN run INTEGER NOT NULL DEFAULT 1;
ALTER TABLE geste_instances ADD COLUMN run_started_at REAL;

-- One row per run that ended by continuing: what it was given and how long it ran.
CREATE TABLE geste_runs (
    instance_id TEXT NOT NULL,
    run         INTEGER NOT NULL,     -- 1 for the instance's first run, then 2, ...
    input       TEXT NOT NULL,        -- its input, JSON (args and kwargs)
    started_at  REAL NOT NULL,
    ended_at    REAL NOT NULL,
    steps       INTEGER NOT NULL,     -- its rows in geste_run_history, the continue_as_new row included
    ended_as    TEXT NOT NULL,        -- 'continued': the one way a run ends while the instance goes on
    PRIMARY KEY (instance_id, run)
) WITHOUT ROWID;

-- The history rows of those runs, as geste_history held them (a run's last row is its continue_as_new).
CREATE TABLE geste_run_history (
    instance_id TEXT NOT NULL,
    run         INTEGER NOT NULL,
    seq         INTEGER NOT NULL,
    kind        TEXT NOT NULL,
    name        TEXT NOT NULL,
    payload     TEXT,
    is_error    INTEGER NOT NULL DEFAULT 0,
    created_at  REAL NOT NULL,
    PRIMARY KEY (instance_id, run, seq)
) WITHOUT ROWID;
