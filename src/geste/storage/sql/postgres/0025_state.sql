-- geste schema, version 25 (PostgreSQL): published state (issue 20; docs/state.md, docs/design.md
-- "Published state"). A workflow publishes values under keys (ctx.set_state, a step): each value is a row
-- of geste_state, numbered per (instance, key) from 1 (version), written by the statement that records
-- the step's history row, so a replay never writes it again. Rows are never updated: the history of
-- values is kept, the latest is the one of the highest version (a backward probe of the primary key).
-- A wait_state call of another process registers in geste_result_waiters with the key it waits for
-- (state_key; NULL: a result() call): set_state notifies (geste_workflow_resumable, a "state" field) only
-- when such a row of another process than the writer's is there, and the instance's end, which deletes
-- the rows and notifies as for result(), tells the waiters that no value will come.
CREATE TABLE {schema}.geste_state (
    instance_id text NOT NULL,
    key         text NOT NULL,
    version     integer NOT NULL,
    value       text NOT NULL,
    run         integer NOT NULL,
    seq         integer NOT NULL,
    created_at  double precision NOT NULL,
    PRIMARY KEY (instance_id, key, version)
);
ALTER TABLE {schema}.geste_result_waiters ADD COLUMN state_key text;
