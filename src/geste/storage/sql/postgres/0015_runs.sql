-- geste schema, version 15 (PostgreSQL): continue-as-new (issue 16). ctx.continue_as_new(...) ends the run
-- of an instance and starts another under the same id, with new input and an empty history. In the same
-- transaction (one statement) the run's history rows move to geste_run_history and its summary goes to
-- geste_runs; the current run's rows stay in geste_history, so nothing that reads the history changes
-- (docs/design.md, "Continue as new"). run: the number of the instance's current run (1 for an instance
-- never continued); run_started_at: when it started (NULL: its created_at). Both columns are added
-- without a table rewrite (a constant default).
ALTER TABLE {schema}.geste_instances ADD COLUMN run integer NOT NULL DEFAULT 1;
ALTER TABLE {schema}.geste_instances ADD COLUMN run_started_at double precision;

-- One row per run that ended by continuing: what it was given and how long it ran.
CREATE TABLE {schema}.geste_runs (
    instance_id text NOT NULL,
    run         integer NOT NULL,
    input       text NOT NULL,
    started_at  double precision NOT NULL,
    ended_at    double precision NOT NULL,
    steps       integer NOT NULL,
    ended_as    text NOT NULL,
    PRIMARY KEY (instance_id, run)
);

-- The history rows of those runs, as geste_history held them (a run's last row is its continue_as_new).
CREATE TABLE {schema}.geste_run_history (
    instance_id text NOT NULL,
    run         integer NOT NULL,
    seq         integer NOT NULL,
    kind        text NOT NULL,
    name        text NOT NULL,
    payload     text,
    is_error    boolean NOT NULL DEFAULT false,
    created_at  double precision NOT NULL,
    PRIMARY KEY (instance_id, run, seq)
);
