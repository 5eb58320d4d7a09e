-- geste schema, version 25 (SQLite): published state (issue 20; docs/state.md, docs/design.md
-- "Published state"). A workflow publishes values under keys (ctx.set_state, a step): each value is a row
-- of geste_state, numbered per (instance, key) from 1 (version), written in the transaction that records
-- the step's history row, so a replay never writes it again. Rows are never updated: the history of
-- values is kept, the latest is the one of the highest version. No waiters' table here: without
-- LISTEN/NOTIFY a wait_state of another process reads the key (after 10 ms, then twice as long each time
-- up to poll_interval).
CREATE TABLE geste_state (
    instance_id TEXT NOT NULL,
    key         TEXT NOT NULL,
    version     INTEGER NOT NULL,
    value       TEXT NOT NULL,
    run         INTEGER NOT NULL,
    seq         INTEGER NOT NULL,
    created_at  REAL NOT NULL,
    PRIMARY KEY (instance_id, key, version)
) WITHOUT ROWID;
