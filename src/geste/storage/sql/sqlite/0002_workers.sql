-- geste schema, version 2 (SQLite): the registry of workers, for `geste status`.
-- One row per worker id, upserted at start and by every heartbeat (lock_timeout / 3); stopped_at is set
-- on a graceful stop. A worker killed outright keeps its row: its heartbeat_at simply grows old.
-- Rows not heard from for a week are deleted when a worker starts, so the table stays as small as the
-- fleet; reads scan it whole. No index on heartbeat_at: every heartbeat would then add an index entry
-- (on PostgreSQL, no HOT update), to speed up a read that `geste status` makes once in a while.

CREATE TABLE geste_workers (
    worker_id    TEXT PRIMARY KEY,
    host         TEXT NOT NULL,
    pid          INTEGER NOT NULL,
    started_at   REAL NOT NULL,
    heartbeat_at REAL NOT NULL,
    running      INTEGER NOT NULL DEFAULT 0,   -- instances it runs, as of its last heartbeat
    concurrency  INTEGER NOT NULL,
    listener     TEXT,                         -- ListenerStatus.as_dict() as JSON, as of its last heartbeat
    stopped_at   REAL
);
