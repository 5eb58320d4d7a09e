-- geste schema, version 19 (SQLite): cron schedules (issue 19; docs/schedules.md). One row per schedule:
-- its definition (cron expression, time zone, workflow, policies), whether it is paused, and next_tick,
-- the next tick it starts (Unix seconds). A round of a worker's schedule loop reads the due rows through
-- geste_schedules_due, and moves next_tick with a conditional update (WHERE next_tick = the value it
-- read) in the transaction that creates the tick's instance (id sched:<name>:<tick>): one worker wins.
-- last_instance_id: the last instance a tick started (the overlap policy reads whether it has ended).
CREATE TABLE geste_schedules (
    name             TEXT PRIMARY KEY,
    workflow_name    TEXT NOT NULL,
    cron             TEXT NOT NULL,
    timezone         TEXT NOT NULL,
    missed           TEXT NOT NULL,
    overlap          TEXT NOT NULL,
    pass_tick        INTEGER NOT NULL DEFAULT 0,
    paused           INTEGER NOT NULL DEFAULT 0,
    next_tick        REAL NOT NULL,
    last_tick        REAL,
    last_instance_id TEXT,
    created_at       REAL NOT NULL,
    updated_at       REAL NOT NULL
);
CREATE INDEX geste_schedules_due ON geste_schedules (next_tick) WHERE paused = 0;
