-- geste schema, version 24 (SQLite): schedules onto a queue, and overlap="queue" (issue 19;
-- docs/schedules.md, docs/design.md "Cron schedules"). queue and priority: each tick's instance is
-- started onto that queue (NULL: none). waiting: how many ticks of the schedule wait, in
-- geste_schedule_waiting, for the schedule's last run to end (overlap="queue"); the loop's release scan
-- reads only the schedules that have some (geste_schedules_waiting).
ALTER TABLE geste_schedules ADD COLUMN queue TEXT;
ALTER TABLE geste_schedules ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
ALTER TABLE geste_schedules ADD COLUMN waiting INTEGER NOT NULL DEFAULT 0;

CREATE INDEX geste_schedules_waiting ON geste_schedules (name) WHERE waiting > 0 AND paused = 0;

CREATE TABLE geste_schedule_waiting (
    name TEXT NOT NULL,
    tick REAL NOT NULL,
    PRIMARY KEY (name, tick)
);
