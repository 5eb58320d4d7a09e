-- geste schema, version 22 (SQLite): queue partitions (issue 19; docs/design.md "Queues", "Partitions").
-- A start onto a queue names a partition key; a start without one is in the key-less partition ''. A
-- queue's partition_concurrency and partition_rate_limit apply to each partition, under its global
-- limits. geste_queue_partitions holds a partition's rate window (made at its first admission on a queue
-- with a partition rate). One writer: a claim's counts, picks and update run in one BEGIN IMMEDIATE.
ALTER TABLE geste_instances ADD COLUMN partition_key TEXT;
ALTER TABLE geste_queues ADD COLUMN partition_concurrency INTEGER;
ALTER TABLE geste_queues ADD COLUMN partition_rate_limit INTEGER;

CREATE TABLE geste_queue_partitions (
    queue  TEXT NOT NULL,
    key    TEXT NOT NULL,
    starts TEXT NOT NULL DEFAULT '[]',
    PRIMARY KEY (queue, key)
);

UPDATE geste_instances SET partition_key = ''
WHERE queue IS NOT NULL AND status IN ('pending', 'running', 'waiting', 'compensating');

DROP INDEX geste_instances_queue_admitted;
CREATE INDEX geste_instances_queue_admitted ON geste_instances (queue, partition_key)
    WHERE queue IS NOT NULL AND queued_at IS NULL
      AND status IN ('pending', 'running', 'waiting', 'compensating');
CREATE INDEX geste_instances_queued_partition
    ON geste_instances (queue, partition_key, priority, queued_at, instance_id)
    WHERE queued_at IS NOT NULL AND status = 'pending';
