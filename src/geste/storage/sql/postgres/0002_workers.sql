-- geste schema, version 2 (PostgreSQL): the registry of workers, for `geste status`.
-- One row per worker id, upserted at start and by every heartbeat (lock_timeout / 3); stopped_at is set
-- on a graceful stop. A worker killed outright keeps its row: its heartbeat_at simply grows old.
-- Rows not heard from for a week are deleted when a worker starts, so the table stays as small as the
-- fleet; reads scan it whole. No index on heartbeat_at, and room left on each page (fillfactor 50), so a
-- heartbeat is a HOT update: an index there would add an entry per heartbeat to speed up a read that
-- `geste status` makes once in a while.

CREATE TABLE {schema}.geste_workers (
    worker_id    text PRIMARY KEY,
    host         text NOT NULL,
    pid          integer NOT NULL,
    started_at   double precision NOT NULL,
    heartbeat_at double precision NOT NULL,
    running      integer NOT NULL DEFAULT 0,   -- instances it runs, as of its last heartbeat
    concurrency  integer NOT NULL,
    listener     text,                         -- ListenerStatus.as_dict() as JSON, as of its last heartbeat
    stopped_at   double precision
) WITH (fillfactor = 50);
