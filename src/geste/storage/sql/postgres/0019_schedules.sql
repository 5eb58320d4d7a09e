-- geste schema, version 19 (PostgreSQL): cron schedules (issue 19; docs/schedules.md). One row per
-- schedule: its definition (cron expression, time zone, workflow, policies), whether it is paused, and
-- next_tick, the next tick it starts (Unix seconds). A round of a worker's schedule loop reads the due
-- rows through geste_schedules_due, and moves next_tick with a conditional update (WHERE next_tick = the
-- value it read; a concurrent one waits for the row and then finds it moved) in the transaction that
-- creates the tick's instance (id sched:<name>:<tick>): one worker wins. last_instance_id: the last
-- instance a tick started (the overlap policy reads whether it has ended).
CREATE TABLE {schema}.geste_schedules (
    name             text PRIMARY KEY,
    workflow_name    text NOT NULL,
    cron             text NOT NULL,
    timezone         text NOT NULL,
    missed           text NOT NULL,
    overlap          text NOT NULL,
    pass_tick        boolean NOT NULL DEFAULT false,
    paused           boolean NOT NULL DEFAULT false,
    next_tick        double precision NOT NULL,
    last_tick        double precision,
    last_instance_id text,
    created_at       double precision NOT NULL,
    updated_at       double precision NOT NULL
);
CREATE INDEX geste_schedules_due ON {schema}.geste_schedules (next_tick) WHERE NOT paused;
