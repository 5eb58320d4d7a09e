-- geste schema, version 20 (SQLite): queues (issue 19; docs/design.md "Queues"). An instance started
-- onto a queue waits, queued (queued_at set, run_at NULL: outside both claim indexes), until a claim of
-- the queue admits it (queued_at NULL, claimed in the same update); admitted and unfinished, it holds one
-- of the queue's slots. geste_queues holds each declared queue's limits. One writer: a claim's count,
-- pick and update run in one BEGIN IMMEDIATE, which serializes the claimers of every process.
ALTER TABLE geste_instances ADD COLUMN queue TEXT;
ALTER TABLE geste_instances ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
ALTER TABLE geste_instances ADD COLUMN queued_at REAL;
ALTER TABLE geste_instances ADD COLUMN dedup_id TEXT;

CREATE TABLE geste_queues (
    name               TEXT PRIMARY KEY,
    concurrency        INTEGER,
    worker_concurrency INTEGER,
    rate_limit         INTEGER,
    rate_period        REAL,
    starts             TEXT NOT NULL DEFAULT '[]',
    updated_at         REAL NOT NULL
);

CREATE INDEX geste_instances_queued ON geste_instances (queue, priority, queued_at)
    WHERE queued_at IS NOT NULL AND status = 'pending';
CREATE INDEX geste_instances_queue_admitted ON geste_instances (queue)
    WHERE queue IS NOT NULL AND queued_at IS NULL
      AND status IN ('pending', 'running', 'waiting', 'compensating');
CREATE UNIQUE INDEX geste_instances_dedup ON geste_instances (queue, dedup_id)
    WHERE dedup_id IS NOT NULL AND status IN ('pending', 'running', 'waiting', 'compensating');
