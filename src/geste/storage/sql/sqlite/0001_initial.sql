-- geste schema, version 1 (SQLite). Times are Unix seconds (REAL).

CREATE TABLE geste_meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE geste_instances (
    instance_id      TEXT PRIMARY KEY,
    workflow_name    TEXT NOT NULL,
    status           TEXT NOT NULL,
    input            TEXT NOT NULL,
    result           TEXT,
    error            TEXT,
    created_at       REAL NOT NULL,
    updated_at       REAL NOT NULL,
    finished_at      REAL,
    run_at           REAL,              -- when it should next run once unlocked; NULL: only a wake-up
    locked_by        TEXT,
    lease_id         TEXT,
    lock_expires_at  REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    steps            INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX geste_instances_runnable ON geste_instances (run_at) WHERE run_at IS NOT NULL;
CREATE INDEX geste_instances_by_status ON geste_instances (status, created_at);
CREATE INDEX geste_instances_by_name ON geste_instances (workflow_name, created_at);
CREATE INDEX geste_instances_by_created ON geste_instances (created_at);

CREATE TABLE geste_history (
    instance_id TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    kind        TEXT NOT NULL,
    name        TEXT NOT NULL,
    payload     TEXT,
    is_error    INTEGER NOT NULL DEFAULT 0,
    created_at  REAL NOT NULL,
    PRIMARY KEY (instance_id, seq)
) WITHOUT ROWID;

CREATE TABLE geste_timers (
    instance_id TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    expires_at  REAL NOT NULL,
    PRIMARY KEY (instance_id, seq)
) WITHOUT ROWID;
CREATE INDEX geste_timers_due ON geste_timers (expires_at);

CREATE TABLE geste_event_waits (
    instance_id TEXT PRIMARY KEY,
    event_type  TEXT NOT NULL,
    match       TEXT,
    since       REAL NOT NULL,
    deadline    REAL
);
CREATE INDEX geste_event_waits_by_type ON geste_event_waits (event_type);

CREATE TABLE geste_events (
    seq                INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id           TEXT NOT NULL UNIQUE,
    event_type         TEXT NOT NULL,
    source             TEXT,
    data               TEXT NOT NULL,
    extensions         TEXT,
    target_instance_id TEXT,
    created_at         REAL NOT NULL
);
CREATE INDEX geste_events_by_type ON geste_events (event_type, created_at);

CREATE TABLE geste_event_deliveries (
    instance_id TEXT NOT NULL,
    event_seq   INTEGER NOT NULL,
    PRIMARY KEY (instance_id, event_seq)
) WITHOUT ROWID;
