-- geste schema, version 26 (PostgreSQL): durable streams (issue 20; docs/streams.md, docs/design.md
-- "Streams"). A workflow or an activity appends items to a named stream of its instance; any process reads
-- them in order from a position. geste_streams holds one row per item: its primary key (instance_id, key,
-- position) is the index a read from a position scans. writer is the write's idempotency key, unique per
-- stream ("<run>:<n>", the n-th write of a workflow's run; "<run>.<step>:<n>", an activity's): a replay's
-- or a retry's rewrite finds it and writes nothing. item NULL is the stream's close.
-- geste_stream_heads: a row per stream, its next position and whether it is closed; a write batch takes
-- its row lock, so one stream's positions follow its commits. geste_stream_readers: a row per reader
-- waiting for a stream in another process (registered only while it waits, like geste_result_waiters):
-- a write batch probes it by key and notifies (geste_stream_written, sent after the commit, batched)
-- only when a row is there.
CREATE TABLE {schema}.geste_streams (
    instance_id text NOT NULL,
    key         text NOT NULL,
    position    bigint NOT NULL,
    writer      text NOT NULL,
    item        text,
    written_at  double precision NOT NULL,
    PRIMARY KEY (instance_id, key, position)
);
CREATE UNIQUE INDEX geste_streams_by_writer ON {schema}.geste_streams (instance_id, key, writer);

CREATE TABLE {schema}.geste_stream_heads (
    instance_id   text NOT NULL,
    key           text NOT NULL,
    next_position bigint NOT NULL,
    closed        boolean NOT NULL DEFAULT false,
    PRIMARY KEY (instance_id, key)
);

CREATE TABLE {schema}.geste_stream_readers (
    instance_id text NOT NULL,
    key         text NOT NULL,
    reader      text NOT NULL,
    process     text NOT NULL,
    expires_at  double precision NOT NULL,
    PRIMARY KEY (instance_id, key, reader)
);
CREATE INDEX geste_stream_readers_by_expiry ON {schema}.geste_stream_readers (expires_at);
