-- The geste schema on SQLite as the migrations leave it (schema version 30), written for a reader.
--
-- Documentation and test oracle only: never applied at runtime. A database is created and upgraded by the
-- numbered migrations beside this file (0001_initial.sql ...), which record their version in geste_meta;
-- tests/test_storage_schema.py applies them all to a fresh file and this file to another, and compares
-- the two catalogues (tables, columns, indexes), so the two cannot drift apart. A migration that changes
-- the schema changes this file too, in the same commit.
--
-- Schema 14 changes nothing here: its table (geste_result_waiters, the result() calls an instance's end
-- notifies) is PostgreSQL's only, since SQLite has no LISTEN/NOTIFY and a result() there reads the instance.
--
-- Times are Unix seconds (REAL) from the workers' clocks. Booleans are INTEGER 0/1. JSON is TEXT.
-- Columns added by a later migration come last in their table (SQLite's ADD COLUMN appends), marked with
-- the version that added them.

-- key/value pairs: application = 'geste', schema_version = the last migration applied
CREATE TABLE geste_meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- One row per workflow instance: its outcome, its lease, when it runs next.
CREATE TABLE geste_instances (
    instance_id      TEXT PRIMARY KEY,
    workflow_name    TEXT NOT NULL,
    status           TEXT NOT NULL,     -- pending, running, waiting, compensating, completed, failed, cancelled
    input            TEXT NOT NULL,     -- JSON {"args": [...], "kwargs": {...}}
    result           TEXT,              -- JSON, once completed
    error            TEXT,              -- JSON, once failed
    created_at       REAL NOT NULL,
    updated_at       REAL NOT NULL,
    finished_at      REAL,
    run_at           REAL,              -- when it should next run once unlocked; NULL: only a wake-up;
                                        -- (11) while held: its take-over time, the lease's expiry as of
                                        -- its claim or its worker's last heartbeat that moved it
    locked_by        TEXT,              -- the worker holding the lease
    lease_id         TEXT,              -- every write under a lease names it (LeaseLost otherwise)
    lock_expires_at  REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    steps            INTEGER NOT NULL DEFAULT 0,   -- history rows written
    event_floor      INTEGER,           -- (8) the last event seq when it was created: it sees the later ones
    last_worker      TEXT,              -- (13) the worker that last ran it: its wake-ups go there
    run              INTEGER NOT NULL DEFAULT 1,   -- (15) its current run: 1, then one more at each continue_as_new
    run_started_at   REAL,              -- (15) when the current run started; NULL: created_at
    parent_id        TEXT,              -- (16) the instance that started it as its child (ctx.start_child)
    parent_close     TEXT,              -- (16) its parent's end: 'cancel', 'abandon' or 'wait' it
    deadline         REAL,              -- (17) when it is cancelled for its deadline; NULL: none
    heartbeats       TEXT,              -- (18) the last ctx.heartbeat details of its running activities
    queue            TEXT,              -- (20) the queue it was started onto; NULL: none
    priority         INTEGER NOT NULL DEFAULT 0,   -- (20) its place in the queue's line: lower first
    queued_at        REAL,              -- (20) while queued (not admitted yet): its start's time
    dedup_id         TEXT,              -- (20) at most one unfinished instance per (queue, dedup_id)
    awaits           TEXT,              -- (21) the child its last child wait suspended for; NULL: none
    partition_key    TEXT,              -- (22) its partition of the queue; '': started without a key
    version          TEXT,              -- (27) the version of the code it started on (the starting App's)
    pinned           INTEGER NOT NULL DEFAULT 0,  -- (27) only workers of its version claim it
    runner           TEXT GENERATED ALWAYS AS (  -- (27) pinned: name U+001F version; NULL: not pinned
        CASE WHEN pinned THEN workflow_name || char(31) || coalesce(version, '') END
    ) VIRTUAL,
    trace_context    TEXT               -- (30) the W3C trace context of the span that started it (docs/tracing.md)
);
-- keyset pages of the viewer and the status counts: one index per filter combination (6)
CREATE INDEX geste_instances_by_status ON geste_instances (status, created_at, instance_id);
CREATE INDEX geste_instances_by_name ON geste_instances (workflow_name, created_at, instance_id);
CREATE INDEX geste_instances_by_created ON geste_instances (created_at, instance_id);
CREATE INDEX geste_instances_by_name_status ON geste_instances (workflow_name, status, created_at, instance_id);
-- the claim of a worker: per workflow it registers, its free instances in run_at order (9; free only: 11;
-- by coalesce(runner, workflow_name), the name or the name and the pinned version: 27)
CREATE INDEX geste_instances_runnable_by_name ON geste_instances (coalesce(runner, workflow_name), run_at)
    WHERE run_at IS NOT NULL AND lease_id IS NULL
      AND status IN ('pending', 'running', 'waiting', 'compensating');
-- and its held instances in take-over order: a claim reads the leases that ran out only (11)
CREATE INDEX geste_instances_leased_by_name ON geste_instances (coalesce(runner, workflow_name), run_at)
    WHERE lease_id IS NOT NULL AND status IN ('pending', 'running', 'waiting', 'compensating');
-- the children of an instance, oldest first (16): clients' instances are not in it
CREATE INDEX geste_instances_by_parent ON geste_instances (parent_id, created_at, instance_id)
    WHERE parent_id IS NOT NULL;
-- the retention (29): the finished instances in the order they ended
CREATE INDEX geste_instances_finished ON geste_instances (finished_at, instance_id)
    WHERE status IN ('completed', 'failed', 'cancelled');

-- The journal: one row per step of an instance, numbered from 1.
CREATE TABLE geste_history (
    instance_id TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    kind        TEXT NOT NULL,          -- activity, sleep, event, message, publish, ...
    name        TEXT NOT NULL,
    payload     TEXT,                   -- JSON
    is_error    INTEGER NOT NULL DEFAULT 0,
    created_at  REAL NOT NULL,
    PRIMARY KEY (instance_id, seq)
) WITHOUT ROWID;

-- The runs an instance ended by continuing (15, ctx.continue_as_new): one row each, what it was given and
-- how long it ran; the current run is geste_instances' own (its input, run, run_started_at).
CREATE TABLE geste_runs (
    instance_id TEXT NOT NULL,
    run         INTEGER NOT NULL,     -- 1 for the instance's first run, then 2, ...
    input       TEXT NOT NULL,        -- its input, JSON (args and kwargs)
    started_at  REAL NOT NULL,
    ended_at    REAL NOT NULL,
    steps       INTEGER NOT NULL,     -- its rows in geste_run_history, the continue_as_new row included
    ended_as    TEXT NOT NULL,        -- 'continued': the one way a run ends while the instance goes on
    PRIMARY KEY (instance_id, run)
) WITHOUT ROWID;

-- Their history rows (15), moved from geste_history by the continue (a run's last row is its
-- continue_as_new); the current run's rows stay in geste_history.
CREATE TABLE geste_run_history (
    instance_id TEXT NOT NULL,
    run         INTEGER NOT NULL,
    seq         INTEGER NOT NULL,
    kind        TEXT NOT NULL,
    name        TEXT NOT NULL,
    payload     TEXT,
    is_error    INTEGER NOT NULL DEFAULT 0,
    created_at  REAL NOT NULL,
    PRIMARY KEY (instance_id, run, seq)
) WITHOUT ROWID;

-- The timers of waiting instances (a sleep, a wait's deadline).
CREATE TABLE geste_timers (
    instance_id TEXT NOT NULL,
    seq         INTEGER NOT NULL,       -- the history position of the step that waits
    expires_at  REAL NOT NULL,
    PRIMARY KEY (instance_id, seq)
) WITHOUT ROWID;
CREATE INDEX geste_timers_due ON geste_timers (expires_at);
-- the patch markers, by patch id (27): what `geste patches` reads
CREATE INDEX geste_history_patches ON geste_history (name, instance_id) WHERE kind = 'patch';

-- An instance's registered wait for an event (at most one).
CREATE TABLE geste_event_waits (
    instance_id TEXT PRIMARY KEY,
    event_type  TEXT NOT NULL,
    match       TEXT,                   -- JSON object of top-level keys the data must have
    since       REAL NOT NULL,          -- when it was registered (shown to operators)
    deadline    REAL,
    outcome_seq INTEGER,                -- (5) where send_event writes the event into the history
    after_seq   INTEGER,                -- (8) the instance's event_floor: only later events match
    match_key   INTEGER                 -- (12) one pair's key, or the type's (no match); NULL: older rows
);
-- a send finds the waits that may accept it by its keys; rows of older versions by type (12)
CREATE INDEX geste_event_waits_by_key ON geste_event_waits (match_key);
CREATE INDEX geste_event_waits_unkeyed ON geste_event_waits (event_type) WHERE match_key IS NULL;

-- Events sent to the app (send_event, POST /events), in the order the database gave them (seq).
CREATE TABLE geste_events (
    seq                INTEGER PRIMARY KEY AUTOINCREMENT,   -- never reused: event floors compare it
    event_id           TEXT NOT NULL UNIQUE,
    event_type         TEXT NOT NULL,
    source             TEXT,
    data               TEXT NOT NULL,   -- JSON
    extensions         TEXT,            -- JSON
    target_instance_id TEXT,            -- for that instance only
    created_at         REAL NOT NULL,
    keyed              INTEGER NOT NULL DEFAULT 0   -- (12) its pairs are in geste_event_keys
);
CREATE INDEX geste_events_by_type ON geste_events (event_type, seq);
-- the retention of events: the oldest first (11)
CREATE INDEX geste_events_by_created ON geste_events (created_at);
-- the events of older versions, read by type by the waits with a match (12)
CREATE INDEX geste_events_unkeyed ON geste_events (event_type, seq) WHERE keyed = 0;

-- The match keys of events (12): one row per top-level key/value pair of an event's data (a hash of the
-- type and the pair's canonical JSON, geste/_matching.py), read by the waits with a match.
CREATE TABLE geste_event_keys (
    match_key INTEGER NOT NULL,
    event_seq INTEGER NOT NULL,
    PRIMARY KEY (match_key, event_seq)
) WITHOUT ROWID;
-- the retention of events deletes their keys with them
CREATE INDEX geste_event_keys_by_event ON geste_event_keys (event_seq);

-- Which instance took which event (each event at most once per instance).
CREATE TABLE geste_event_deliveries (
    instance_id TEXT NOT NULL,
    event_seq   INTEGER NOT NULL,
    PRIMARY KEY (instance_id, event_seq)
) WITHOUT ROWID;
-- the retention of events deletes deliveries with their event (3)
CREATE INDEX geste_event_deliveries_by_event ON geste_event_deliveries (event_seq);

-- The registry of workers, for `geste status` (2): upserted at start and by every heartbeat. No index on
-- heartbeat_at: every heartbeat would add an entry, for a read `geste status` makes once in a while.
CREATE TABLE geste_workers (
    worker_id    TEXT PRIMARY KEY,
    host         TEXT NOT NULL,
    pid          INTEGER NOT NULL,
    started_at   REAL NOT NULL,
    heartbeat_at REAL NOT NULL,
    running      INTEGER NOT NULL DEFAULT 0,   -- instances it runs, as of its last heartbeat
    concurrency  INTEGER NOT NULL,
    listener     TEXT,                         -- ListenerStatus.as_dict() as JSON, as of its last heartbeat
    stopped_at   REAL,                         -- a graceful stop
    lock_timeout REAL,                         -- (7) its own; NULL in rows written before
    workflows    TEXT,                         -- (9) the names it registers, a JSON array
    health       TEXT,                         -- (9) NULL while every background loop runs, else why one ended
    relay        INTEGER NOT NULL DEFAULT 0,   -- (13) it runs an outbox relay
    queues       TEXT,                         -- (23) the queues it serves, a JSON array
    version      TEXT                          -- (27) the version of its code (App(version=...))
);

-- Channels (3): every published message in publication order. claimed_by: the instance that took a
-- message only one may take (a direct one, or one taken by a competing subscriber).
CREATE TABLE geste_channel_messages (
    seq                INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id         TEXT NOT NULL UNIQUE,
    channel            TEXT NOT NULL,
    data               TEXT NOT NULL,   -- JSON
    sender_instance_id TEXT,
    target_instance_id TEXT,            -- send_to: for that instance only
    created_at         REAL NOT NULL,
    claimed_by         TEXT
);
CREATE INDEX geste_channel_messages_by_channel ON geste_channel_messages (channel, seq);
CREATE INDEX geste_channel_messages_direct ON geste_channel_messages (target_instance_id, channel, seq)
    WHERE target_instance_id IS NOT NULL AND claimed_by IS NULL;
-- the re-wake: per channel, the first message nobody took (11); the retention: the oldest first (11)
CREATE INDEX geste_channel_messages_unclaimed ON geste_channel_messages (channel, seq)
    WHERE target_instance_id IS NULL AND claimed_by IS NULL;
CREATE INDEX geste_channel_messages_by_created ON geste_channel_messages (created_at, seq);

-- One row per (channel, instance): the instance takes the messages after cursor_seq; waiting_since is set
-- while it is suspended in receive() on this channel.
CREATE TABLE geste_channel_subscriptions (
    channel       TEXT NOT NULL,
    instance_id   TEXT NOT NULL,
    mode          TEXT NOT NULL,          -- 'broadcast' or 'competing'
    cursor_seq    INTEGER NOT NULL,
    waiting_since REAL,
    created_at    REAL NOT NULL,
    PRIMARY KEY (channel, instance_id)
) WITHOUT ROWID;
CREATE INDEX geste_channel_subscriptions_by_instance ON geste_channel_subscriptions (instance_id);
CREATE INDEX geste_channel_subscriptions_waiting ON geste_channel_subscriptions (channel, mode, waiting_since)
    WHERE waiting_since IS NOT NULL;
-- the lowest cursor of a channel's subscribers of one mode: whether a message is still needed, and the
-- waiting competing subscribers behind a message nobody took (11)
CREATE INDEX geste_channel_subscriptions_by_cursor ON geste_channel_subscriptions (channel, mode, cursor_seq);

-- The transactional outbox (4): one row per event a workflow emitted (ctx.send_event), written with the
-- step, delivered by a relay in per-instance order. status: pending, delivered, dead, discarded (10).
CREATE TABLE geste_outbox (
    event_id         TEXT PRIMARY KEY,
    instance_id      TEXT NOT NULL,
    step_seq         INTEGER NOT NULL,      -- the history seq of the send_event step
    event_type       TEXT NOT NULL,
    source           TEXT NOT NULL,
    subject          TEXT,
    data             TEXT,                  -- JSON text; NULL: no data
    status           TEXT NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  REAL,                  -- pending rows only; NULL: held behind an earlier event
    last_error       TEXT,
    created_at       REAL NOT NULL,
    updated_at       REAL NOT NULL,
    delivered_at     REAL,
    claimed_by       TEXT,                  -- the relay sending it, under claim_id until claim_expires_at
    claim_id         TEXT,
    claim_expires_at REAL
) WITHOUT ROWID;
-- claims and the relay's next wake-up read the pending rows only
CREATE INDEX geste_outbox_due ON geste_outbox (next_attempt_at) WHERE status = 'pending';
-- the event of an instance just before a due one, pending or dead (10): the per-instance order
CREATE INDEX geste_outbox_pending_by_instance ON geste_outbox (instance_id, step_seq)
    WHERE status = 'pending';
CREATE INDEX geste_outbox_dead_by_instance ON geste_outbox (instance_id, step_seq) WHERE status = 'dead';
-- the operator's listing, newest first; the oldest pending event (its age in geste status) (10)
CREATE INDEX geste_outbox_by_created ON geste_outbox (created_at);
CREATE INDEX geste_outbox_pending_by_created ON geste_outbox (created_at) WHERE status = 'pending';
-- the retention (29): the delivered or discarded events of an instance, deleted with it
CREATE INDEX geste_outbox_done_by_instance ON geste_outbox (instance_id)
    WHERE status IN ('delivered', 'discarded');

-- The audit trail of operator retries (7): what each retry removed and cleared.
CREATE TABLE geste_retries (
    instance_id TEXT NOT NULL,
    retry       INTEGER NOT NULL,     -- 1 for the first retry of the instance, then 2, ...
    retried_at  REAL NOT NULL,
    from_seq    INTEGER NOT NULL,     -- the first step run again: the rows from it on were removed
    error       TEXT,                 -- the error the instance had failed with (JSON)
    failed_at   REAL,                 -- when it had failed (its finished_at)
    removed     TEXT NOT NULL,        -- the removed history rows, JSON [[seq, kind, name, payload, is_error, created_at], ...]
    PRIMARY KEY (instance_id, retry)
) WITHOUT ROWID;

-- The chores of the cluster (11): a row per chore, taken for a round by one worker at a time (a
-- conditional upsert when the round is due); the holder of the last round takes the next, another only
-- once it is a round late or gave the chore back (holder NULL).
CREATE TABLE geste_chores (
    chore    TEXT PRIMARY KEY,     -- channel_rewake, channel_cleanup
    holder   TEXT,                 -- the worker that took the last round; NULL: given back
    next_at  REAL NOT NULL,        -- when the next round is due
    taken_at REAL                  -- when the last round was taken
) WITHOUT ROWID;

-- Cron schedules (19; docs/schedules.md): one row per schedule, its definition and the next tick it
-- starts. A worker's schedule loop reads the due rows (geste_schedules_due) and moves next_tick with a
-- conditional update in the transaction that creates the tick's instance (id sched:<name>:<tick>).
CREATE TABLE geste_schedules (
    name             TEXT PRIMARY KEY,
    workflow_name    TEXT NOT NULL,
    cron             TEXT NOT NULL,     -- a cron expression (5 fields, or 6 with seconds first), cronsim's
    timezone         TEXT NOT NULL,     -- the IANA time zone the expression is read in
    missed           TEXT NOT NULL,     -- latest, skip, all: the ticks that passed while no worker ran
    overlap          TEXT NOT NULL,     -- skip, alongside, queue (24): a tick while the last run is unfinished
    pass_tick        INTEGER NOT NULL DEFAULT 0,   -- the workflow takes the tick as its argument
    paused           INTEGER NOT NULL DEFAULT 0,
    next_tick        REAL NOT NULL,     -- the next tick to start (Unix seconds)
    last_tick        REAL,              -- the last tick started
    last_instance_id TEXT,              -- the instance it started
    created_at       REAL NOT NULL,
    updated_at       REAL NOT NULL,
    queue            TEXT,              -- (24) the queue each tick's instance is started onto
    priority         INTEGER NOT NULL DEFAULT 0,   -- (24) its place in that queue's line
    waiting          INTEGER NOT NULL DEFAULT 0    -- (24) its ticks in geste_schedule_waiting
);
-- the schedule loop: the due schedules, in next_tick order; paused ones cost it nothing
CREATE INDEX geste_schedules_due ON geste_schedules (next_tick) WHERE paused = 0;
-- the schedule loop's release scan: the schedules with ticks waiting (24)
CREATE INDEX geste_schedules_waiting ON geste_schedules (name) WHERE waiting > 0 AND paused = 0;

-- The ticks of a schedule with overlap = 'queue' that wait for its last run to end, oldest first (24); the
-- release that creates a tick's instance deletes its row in the same transaction.
CREATE TABLE geste_schedule_waiting (
    name TEXT NOT NULL,
    tick REAL NOT NULL,
    PRIMARY KEY (name, tick)
);

-- Queues (20; docs/design.md "Queues"): each declared queue's limits. An instance started onto a queue
-- waits, queued (queued_at set, run_at NULL: outside both claim indexes), until a claim admits it.
CREATE TABLE geste_queues (
    name               TEXT PRIMARY KEY,
    concurrency        INTEGER,          -- admitted and unfinished instances at most, cluster-wide; NULL: any
    worker_concurrency INTEGER,          -- of those, admitted by one worker and running there; NULL: any
    rate_limit         INTEGER,          -- admissions at most in any window of rate_period seconds; NULL: any
    rate_period        REAL,
    starts             TEXT NOT NULL DEFAULT '[]',  -- the admission times of the last window (JSON)
    updated_at         REAL NOT NULL,
    partition_concurrency INTEGER,       -- (22) admitted and unfinished instances at most per partition
    partition_rate_limit  INTEGER        -- (22) admissions at most per partition in any window of rate_period
);
-- (22) a partition's rate window, made at its first admission on a queue with a partition rate
CREATE TABLE geste_queue_partitions (
    queue  TEXT NOT NULL,
    key    TEXT NOT NULL,
    starts TEXT NOT NULL DEFAULT '[]',
    PRIMARY KEY (queue, key)
);
-- the waiting line of a queue, in claim order (priority, then first come first served)
CREATE INDEX geste_instances_queued ON geste_instances (queue, priority, queued_at)
    WHERE queued_at IS NOT NULL AND status = 'pending';
-- the slots in use: admitted and unfinished (an end, whatever its path, changes the status)
CREATE INDEX geste_instances_queue_admitted ON geste_instances (queue, partition_key)
    WHERE queue IS NOT NULL AND queued_at IS NULL
      AND status IN ('pending', 'running', 'waiting', 'compensating');
-- at most one unfinished instance per dedup id and queue
CREATE UNIQUE INDEX geste_instances_dedup ON geste_instances (queue, dedup_id)
    WHERE dedup_id IS NOT NULL AND status IN ('pending', 'running', 'waiting', 'compensating');
-- (22) each partition's waiting line, in claim order
CREATE INDEX geste_instances_queued_partition
    ON geste_instances (queue, partition_key, priority, queued_at, instance_id)
    WHERE queued_at IS NOT NULL AND status = 'pending';

-- Published state (25; docs/state.md): each value a workflow publishes under a key (ctx.set_state, a step),
-- numbered per (instance, key) from 1, written in the transaction that records the step's history row.
-- Never updated: the history of values is kept; the latest is the highest version. Kept after the
-- instance's end and across continue_as_new (versions go on).
CREATE TABLE geste_state (
    instance_id TEXT NOT NULL,
    key         TEXT NOT NULL,
    version     INTEGER NOT NULL,  -- 1, 2, ... per (instance, key): wait_state(after=...) takes it
    value       TEXT NOT NULL,     -- JSON
    run         INTEGER NOT NULL,  -- the run that set it (continue_as_new)
    seq         INTEGER NOT NULL,  -- the set_state step in that run's history
    created_at  REAL NOT NULL,
    PRIMARY KEY (instance_id, key, version)
) WITHOUT ROWID;

-- Durable streams (26; docs/streams.md): one row per item of an instance's named stream, read in position
-- order from any position through the primary key. writer: the write's idempotency key, unique per stream
-- (a replay's or a retried activity's rewrite writes nothing); item NULL: the stream's close.
CREATE TABLE geste_streams (
    instance_id TEXT NOT NULL,
    key         TEXT NOT NULL,
    position    INTEGER NOT NULL,
    writer      TEXT NOT NULL,
    item        TEXT,                -- JSON; NULL: the close
    written_at  REAL NOT NULL,
    PRIMARY KEY (instance_id, key, position)
);
CREATE UNIQUE INDEX geste_streams_by_writer ON geste_streams (instance_id, key, writer);
-- (26) each stream's next position and whether it is closed
CREATE TABLE geste_stream_heads (
    instance_id   TEXT NOT NULL,
    key           TEXT NOT NULL,
    next_position INTEGER NOT NULL,
    closed        INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (instance_id, key)
);
