-- geste schema, version 26 (SQLite): durable streams (issue 20; docs/streams.md, docs/design.md
-- "Streams"). geste_streams: one row per item, its primary key (instance_id, key, position) the index a
-- read from a position scans; writer the write's idempotency key, unique per stream (a replay's or a
-- retry's rewrite writes nothing); item NULL the stream's close. geste_stream_heads: each stream's next
-- position and whether it is closed. No readers' table: SQLite has no LISTEN/NOTIFY, a reader in another
-- process polls (one in the writer's process is woken in memory).
CREATE TABLE geste_streams (
    instance_id TEXT NOT NULL,
    key         TEXT NOT NULL,
    position    INTEGER NOT NULL,
    writer      TEXT NOT NULL,
    item        TEXT,
    written_at  REAL NOT NULL,
    PRIMARY KEY (instance_id, key, position)
);
CREATE UNIQUE INDEX geste_streams_by_writer ON geste_streams (instance_id, key, writer);

CREATE TABLE geste_stream_heads (
    instance_id   TEXT NOT NULL,
    key           TEXT NOT NULL,
    next_position INTEGER NOT NULL,
    closed        INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (instance_id, key)
);
