-- geste schema, version 24 (PostgreSQL): schedules onto a queue, and overlap="queue" (issue 19;
-- docs/schedules.md, docs/design.md "Cron schedules"). queue and priority: each tick's instance is
-- started onto that queue (NULL: none). waiting: how many ticks of the schedule wait, in
-- geste_schedule_waiting, for the schedule's last run to end (overlap="queue"); the loop's release scan
-- reads only the schedules that have some (geste_schedules_waiting). Constant defaults: no rewrite.
ALTER TABLE {schema}.geste_schedules
    ADD COLUMN queue text,
    ADD COLUMN priority integer NOT NULL DEFAULT 0,
    ADD COLUMN waiting integer NOT NULL DEFAULT 0;

CREATE INDEX geste_schedules_waiting ON {schema}.geste_schedules (name) WHERE waiting > 0 AND NOT paused;

-- The ticks that wait for the schedule's previous run to end, oldest first; the release that creates a
-- tick's instance deletes its row in the same transaction.
CREATE TABLE {schema}.geste_schedule_waiting (
    name text NOT NULL,
    tick double precision NOT NULL,
    PRIMARY KEY (name, tick)
);
