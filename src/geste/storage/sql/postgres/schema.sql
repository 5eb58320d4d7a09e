-- The geste schema on PostgreSQL as the migrations leave it (schema version 30), written for a reader.
--
-- Documentation and test oracle only: never applied at runtime. A database is created and upgraded by the
-- numbered migrations beside this file (0001_initial.sql ...), under an advisory lock, which record their
-- version in geste_meta; tests/test_storage_schema.py applies them all to a fresh schema and this file to
-- another, and compares the two catalogues (tables and their storage options, columns with types,
-- nullability and defaults, constraints, indexes, sequences, functions), so the two cannot drift apart.
-- A migration that changes the schema changes this file too, in the same commit.
--
-- Names are written unqualified here: every object lives in the configured schema (the URL's ?schema=,
-- public by default), which the migrations name as {schema}. Times are Unix seconds (double precision)
-- from the workers' clocks; JSON is text. Columns added by a later migration come last in their table,
-- marked with the version that added them.

-- key/value pairs: application = 'geste', schema_version = the last migration applied
CREATE TABLE geste_meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);

-- One row per workflow instance: its outcome, its lease, when it runs next. Room is left on each page
-- (fillfactor 80): every step commit updates the row, and a HOT update needs room on its page.
CREATE TABLE geste_instances (
    instance_id      text PRIMARY KEY,
    workflow_name    text NOT NULL,
    status           text NOT NULL,     -- pending, running, waiting, compensating, completed, failed, cancelled
    input            text NOT NULL,     -- JSON {"args": [...], "kwargs": {...}}
    result           text,              -- JSON, once completed
    error            text,              -- JSON, once failed
    created_at       double precision NOT NULL,
    updated_at       double precision NOT NULL,
    finished_at      double precision,
    run_at           double precision,  -- when it should next run once unlocked; NULL: only a wake-up;
                                        -- (11) while held: its take-over time, the lease's expiry as of
                                        -- its claim or its worker's last heartbeat that moved it
    locked_by        text,              -- the worker holding the lease
    lease_id         text,              -- every write under a lease names it (LeaseLost otherwise)
    lock_expires_at  double precision,
    cancel_requested boolean NOT NULL DEFAULT false,
    steps            integer NOT NULL DEFAULT 0,   -- history rows written
    event_floor      bigint,            -- (8) drawn from geste_events_seq_seq at creation: later events are seen
    last_worker      text,              -- (13) the worker that last ran it: its wake-ups go there
    run              integer NOT NULL DEFAULT 1,   -- (15) its current run: 1, then one more at each continue_as_new
    run_started_at   double precision,  -- (15) when the current run started; NULL: created_at
    parent_id        text,              -- (16) the instance that started it as its child (ctx.start_child)
    parent_close     text,              -- (16) its parent's end: 'cancel', 'abandon' or 'wait' it
    deadline         double precision,  -- (17) when it is cancelled for its deadline; NULL: none
    heartbeats       text,              -- (18) the last ctx.heartbeat details of its running activities
    queue            text,              -- (20) the queue it was started onto; NULL: none
    priority         integer NOT NULL DEFAULT 0,   -- (20) its place in the queue's line: lower first
    queued_at        double precision,  -- (20) while queued (not admitted yet): its start's time
    dedup_id         text,              -- (20) at most one unfinished instance per (queue, dedup_id)
    awaits           text,              -- (21) the child its last child wait suspended for; NULL: none
    partition_key    text,              -- (22) its partition of the queue; '': started without a key
    version          text,              -- (27) the version of the code it started on (the starting App's)
    pinned           boolean NOT NULL DEFAULT false,  -- (27) only workers of its version claim it
    runner           text GENERATED ALWAYS AS (  -- (27) pinned: name U+001F version; NULL: not pinned
        CASE WHEN pinned THEN workflow_name || chr(31) || coalesce(version, '') END
    ) STORED,
    trace_context    text               -- (30) the W3C trace context of the span that started it (docs/tracing.md)
) WITH (fillfactor = 80);
-- keyset pages of the viewer and the status counts: one index per filter combination (6)
CREATE INDEX geste_instances_by_status ON geste_instances (status, created_at, instance_id);
CREATE INDEX geste_instances_by_name ON geste_instances (workflow_name, created_at, instance_id);
CREATE INDEX geste_instances_by_created ON geste_instances (created_at, instance_id);
CREATE INDEX geste_instances_by_name_status ON geste_instances (workflow_name, status, created_at, instance_id);
-- the claim of a worker: per workflow it registers, its free instances in run_at order (9; free only: 11;
-- by coalesce(runner, workflow_name), the name or the name and the pinned version: 27)
CREATE INDEX geste_instances_runnable_by_name
    ON geste_instances ((coalesce(runner, workflow_name)), run_at)
    WHERE run_at IS NOT NULL AND lease_id IS NULL
      AND status IN ('pending', 'running', 'waiting', 'compensating');
-- and its held instances in take-over order: a claim reads the leases that ran out only (11)
CREATE INDEX geste_instances_leased_by_name
    ON geste_instances ((coalesce(runner, workflow_name)), run_at)
    WHERE lease_id IS NOT NULL AND status IN ('pending', 'running', 'waiting', 'compensating');
-- the children of an instance, oldest first (16): clients' instances are not in it
CREATE INDEX geste_instances_by_parent ON geste_instances (parent_id, created_at, instance_id)
    WHERE parent_id IS NOT NULL;
-- the retention (29): the finished instances in the order they ended
CREATE INDEX geste_instances_finished ON geste_instances (finished_at, instance_id)
    WHERE status IN ('completed', 'failed', 'cancelled');

-- The journal: one row per step of an instance, numbered from 1.
CREATE TABLE geste_history (
    instance_id text NOT NULL,
    seq         integer NOT NULL,
    kind        text NOT NULL,          -- activity, sleep, event, message, publish, ...
    name        text NOT NULL,
    payload     text,                   -- JSON
    is_error    boolean NOT NULL DEFAULT false,
    created_at  double precision NOT NULL,
    PRIMARY KEY (instance_id, seq)
);
-- the patch markers, by patch id (27): what `geste patches` reads
CREATE INDEX geste_history_patches ON geste_history (name, instance_id) WHERE kind = 'patch';

-- The runs an instance ended by continuing (15, ctx.continue_as_new): one row each, what it was given and
-- how long it ran; the current run is geste_instances' own (its input, run, run_started_at).
CREATE TABLE geste_runs (
    instance_id text NOT NULL,
    run         integer NOT NULL,            -- 1 for the instance's first run, then 2, ...
    input       text NOT NULL,               -- its input, JSON (args and kwargs)
    started_at  double precision NOT NULL,
    ended_at    double precision NOT NULL,
    steps       integer NOT NULL,            -- its rows in geste_run_history, the continue_as_new row included
    ended_as    text NOT NULL,               -- 'continued': the one way a run ends while the instance goes on
    PRIMARY KEY (instance_id, run)
);

-- Their history rows (15), moved from geste_history by the continue (a run's last row is its
-- continue_as_new); the current run's rows stay in geste_history.
CREATE TABLE geste_run_history (
    instance_id text NOT NULL,
    run         integer NOT NULL,
    seq         integer NOT NULL,
    kind        text NOT NULL,
    name        text NOT NULL,
    payload     text,
    is_error    boolean NOT NULL DEFAULT false,
    created_at  double precision NOT NULL,
    PRIMARY KEY (instance_id, run, seq)
);

-- The timers of waiting instances (a sleep, a wait's deadline).
CREATE TABLE geste_timers (
    instance_id text NOT NULL,
    seq         integer NOT NULL,       -- the history position of the step that waits
    expires_at  double precision NOT NULL,
    PRIMARY KEY (instance_id, seq)
);
CREATE INDEX geste_timers_due ON geste_timers (expires_at);

-- An instance's registered wait for an event (at most one).
CREATE TABLE geste_event_waits (
    instance_id text PRIMARY KEY,
    event_type  text NOT NULL,
    match       text,                   -- JSON object of top-level keys the data must have
    since       double precision NOT NULL,   -- when it was registered (shown to operators)
    deadline    double precision,
    outcome_seq integer,                -- (5) where send_event writes the event into the history
    after_seq   bigint,                 -- (8) the instance's event_floor: only later events match
    match_key   bigint,                 -- (12) one pair's key, or the type's (no match); NULL: older rows
    match_pairs text[]                  -- (12) the canonical "key":value texts an event must all have
);
-- a send finds the waits that may accept it by its keys; rows of older versions by type (12)
CREATE INDEX geste_event_waits_by_key ON geste_event_waits (match_key);
CREATE INDEX geste_event_waits_unkeyed ON geste_event_waits (event_type) WHERE match_key IS NULL;

-- Events sent to the app (send_event, POST /events), in the order their sequence gave them (seq).
CREATE TABLE geste_events (
    seq                bigserial PRIMARY KEY,   -- geste_events_seq_seq: also draws the instances' floors
    event_id           text NOT NULL UNIQUE,
    event_type         text NOT NULL,
    source             text,
    data               text NOT NULL,   -- JSON
    extensions         text,            -- JSON
    target_instance_id text,            -- for that instance only
    created_at         double precision NOT NULL,
    keyed              boolean NOT NULL DEFAULT false   -- (12) its pairs are in geste_event_keys
);
CREATE INDEX geste_events_by_type ON geste_events (event_type, seq);
-- the retention of events: the oldest first (11)
CREATE INDEX geste_events_by_created ON geste_events (created_at);
-- the events of older versions, read by type by the waits with a match (12)
CREATE INDEX geste_events_unkeyed ON geste_events (event_type, seq) WHERE NOT keyed;

-- The match keys of events (12): one row per top-level key/value pair of an event's data (a hash of the
-- type and the pair's canonical JSON, geste/_matching.py), read by the waits with a match.
CREATE TABLE geste_event_keys (
    match_key bigint NOT NULL,
    event_seq bigint NOT NULL,
    PRIMARY KEY (match_key, event_seq)
);
-- the retention of events deletes their keys with them
CREATE INDEX geste_event_keys_by_event ON geste_event_keys (event_seq);

-- Which instance took which event (each event at most once per instance).
CREATE TABLE geste_event_deliveries (
    instance_id text NOT NULL,
    event_seq   bigint NOT NULL,
    PRIMARY KEY (instance_id, event_seq)
);
-- the retention of events deletes deliveries with their event (3)
CREATE INDEX geste_event_deliveries_by_event ON geste_event_deliveries (event_seq);

-- The registry of workers, for `geste status` (2): upserted at start and by every heartbeat. No index on
-- heartbeat_at and room on each page (fillfactor 50), so that a heartbeat is a HOT update.
CREATE TABLE geste_workers (
    worker_id    text PRIMARY KEY,
    host         text NOT NULL,
    pid          integer NOT NULL,
    started_at   double precision NOT NULL,
    heartbeat_at double precision NOT NULL,
    running      integer NOT NULL DEFAULT 0,   -- instances it runs, as of its last heartbeat
    concurrency  integer NOT NULL,
    listener     text,                         -- ListenerStatus.as_dict() as JSON, as of its last heartbeat
    stopped_at   double precision,             -- a graceful stop
    lock_timeout double precision,             -- (7) its own; NULL in rows written before
    workflows    text,                         -- (9) the names it registers, a JSON array
    health       text,                         -- (9) NULL while every background loop runs, else why one ended
    relay        boolean NOT NULL DEFAULT false, -- (13) it runs an outbox relay
    queues       text,                         -- (23) the queues it serves, a JSON array
    version      text                          -- (27) the version of its code (App(version=...))
) WITH (fillfactor = 50);

-- Channels (3): every published message in publication order. claimed_by: the instance that took a
-- message only one may take (a direct one, or one taken by a competing subscriber).
CREATE TABLE geste_channel_messages (
    seq                bigserial PRIMARY KEY,
    message_id         text NOT NULL UNIQUE,
    channel            text NOT NULL,
    data               text NOT NULL,   -- JSON
    sender_instance_id text,
    target_instance_id text,            -- send_to: for that instance only
    created_at         double precision NOT NULL,
    claimed_by         text
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
    channel       text NOT NULL,
    instance_id   text NOT NULL,
    mode          text NOT NULL,          -- 'broadcast' or 'competing'
    cursor_seq    bigint NOT NULL,
    waiting_since double precision,
    created_at    double precision NOT NULL,
    PRIMARY KEY (channel, instance_id)
);
CREATE INDEX geste_channel_subscriptions_by_instance ON geste_channel_subscriptions (instance_id);
CREATE INDEX geste_channel_subscriptions_waiting ON geste_channel_subscriptions (channel, mode, waiting_since)
    WHERE waiting_since IS NOT NULL;
-- the lowest cursor of a channel's subscribers of one mode: whether a message is still needed, and the
-- waiting competing subscribers behind a message nobody took (11)
CREATE INDEX geste_channel_subscriptions_by_cursor ON geste_channel_subscriptions (channel, mode, cursor_seq);

-- The transactional outbox (4): one row per event a workflow emitted (ctx.send_event), written by the
-- statement that records the step, delivered by a relay in per-instance order. status: pending,
-- delivered, dead, discarded (10). Rows change a few times each: room on each page (fillfactor 70).
CREATE TABLE geste_outbox (
    event_id         text PRIMARY KEY,
    instance_id      text NOT NULL,
    step_seq         integer NOT NULL,      -- the history seq of the send_event step
    event_type       text NOT NULL,
    source           text NOT NULL,
    subject          text,
    data             text,                  -- JSON text; NULL: no data
    status           text NOT NULL,
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  double precision,      -- pending rows only; NULL: held behind an earlier event
    last_error       text,
    created_at       double precision NOT NULL,
    updated_at       double precision NOT NULL,
    delivered_at     double precision,
    claimed_by       text,                  -- the relay sending it, under claim_id until claim_expires_at
    claim_id         text,
    claim_expires_at double precision
) WITH (fillfactor = 70);
-- claims and the relay's next wake-up read the pending rows only
CREATE INDEX geste_outbox_due ON geste_outbox (next_attempt_at) WHERE status = 'pending';
-- the event of an instance just before a due one, pending or dead (10): the per-instance order
CREATE INDEX geste_outbox_pending_by_instance ON geste_outbox (instance_id, step_seq)
    WHERE status = 'pending';
CREATE INDEX geste_outbox_dead_by_instance ON geste_outbox (instance_id, step_seq)
    WHERE status = 'dead';
-- the operator's listing, newest first; the oldest pending event (its age in geste status) (10)
CREATE INDEX geste_outbox_by_created ON geste_outbox (created_at);
CREATE INDEX geste_outbox_pending_by_created ON geste_outbox (created_at)
    WHERE status = 'pending';
-- the retention (29): the delivered or discarded events of an instance, deleted with it
CREATE INDEX geste_outbox_done_by_instance ON geste_outbox (instance_id)
    WHERE status IN ('delivered', 'discarded');

-- The audit trail of operator retries (7): what each retry removed and cleared.
CREATE TABLE geste_retries (
    instance_id text NOT NULL,
    retry       integer NOT NULL,            -- 1 for the first retry of the instance, then 2, ...
    retried_at  double precision NOT NULL,
    from_seq    integer NOT NULL,            -- the first step run again: the rows from it on were removed
    error       text,                        -- the error the instance had failed with (JSON)
    failed_at   double precision,            -- when it had failed (its finished_at)
    removed     text NOT NULL,               -- the removed rows, JSON [[seq, kind, name, payload, is_error, created_at], ...]
    PRIMARY KEY (instance_id, retry)
);

-- The chores of the cluster (11): a row per chore, taken for a round by one worker at a time (a
-- conditional upsert when the round is due); the holder of the last round takes the next, another only
-- once it is a round late or gave the chore back (holder NULL). A row each: room for HOT updates.
CREATE TABLE geste_chores (
    chore    text PRIMARY KEY,              -- channel_rewake, channel_cleanup
    holder   text,                          -- the worker that took the last round; NULL: given back
    next_at  double precision NOT NULL,     -- when the next round is due
    taken_at double precision               -- when the last round was taken
) WITH (fillfactor = 50);

-- The result() calls waiting for an instance that another process may end (14): one row per call, written
-- by the waiting process, deleted by the statement that ends the instance (which notifies when a row of a
-- process other than the ending worker's was there), by the waiter when it gives up, or by the cleanup
-- chore once expired (the waiter died). No foreign key to geste_instances: its check would lock the
-- instance's row, which a claim's SKIP LOCKED would then skip.
CREATE TABLE geste_result_waiters (
    instance_id text NOT NULL,
    waiter      text NOT NULL,              -- the result() call: an id of its own
    process     text NOT NULL,              -- the worker id of the waiting App
    expires_at  double precision NOT NULL,  -- renewed while it waits; past it, the chore deletes the row
    state_key   text,                       -- (25) a wait_state call: the key it waits for; NULL: result()
    PRIMARY KEY (instance_id, waiter)
);
-- the cleanup chore: the expired rows, oldest first (14)
CREATE INDEX geste_result_waiters_by_expiry ON geste_result_waiters (expires_at);

-- Cron schedules (19; docs/schedules.md): one row per schedule, its definition and the next tick it
-- starts. A worker's schedule loop reads the due rows (geste_schedules_due) and moves next_tick with a
-- conditional update in the transaction that creates the tick's instance (id sched:<name>:<tick>).
CREATE TABLE geste_schedules (
    name             text PRIMARY KEY,
    workflow_name    text NOT NULL,
    cron             text NOT NULL,              -- a cron expression (5 fields, or 6 with seconds first)
    timezone         text NOT NULL,              -- the IANA time zone the expression is read in
    missed           text NOT NULL,              -- latest, skip, all: ticks that passed while no worker ran
    overlap          text NOT NULL,              -- skip, alongside, queue (24): a tick while the last run is unfinished
    pass_tick        boolean NOT NULL DEFAULT false,  -- the workflow takes the tick as its argument
    paused           boolean NOT NULL DEFAULT false,
    next_tick        double precision NOT NULL,  -- the next tick to start (Unix seconds)
    last_tick        double precision,           -- the last tick started
    last_instance_id text,                       -- the instance it started
    created_at       double precision NOT NULL,
    updated_at       double precision NOT NULL,
    queue            text,                       -- (24) the queue each tick's instance is started onto
    priority         integer NOT NULL DEFAULT 0, -- (24) its place in that queue's line
    waiting          integer NOT NULL DEFAULT 0  -- (24) its ticks in geste_schedule_waiting
);
-- the schedule loop: the due schedules, in next_tick order; paused ones cost it nothing
CREATE INDEX geste_schedules_due ON geste_schedules (next_tick) WHERE NOT paused;
-- the schedule loop's release scan: the schedules with ticks waiting (24)
CREATE INDEX geste_schedules_waiting ON geste_schedules (name) WHERE waiting > 0 AND NOT paused;

-- The ticks of a schedule with overlap = 'queue' that wait for its last run to end, oldest first (24); the
-- release that creates a tick's instance deletes its row in the same transaction.
CREATE TABLE geste_schedule_waiting (
    name text NOT NULL,
    tick double precision NOT NULL,
    PRIMARY KEY (name, tick)
);

-- The names of a claim's workflows as a set the planner counts as one row (9): with it the generic plan
-- of claim_names costs what its custom plans do and is kept (unnest is counted as ten rows).
CREATE FUNCTION geste_names(names text[]) RETURNS SETOF text
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE ROWS 1 AS $$
BEGIN
    RETURN QUERY SELECT unnest(names);
END
$$;

-- Queues (20; docs/design.md "Queues"): each declared queue's limits, and the row the claims of a limited
-- queue take turns on. An instance started onto a queue waits, queued (queued_at set, run_at NULL:
-- outside both claim indexes), until a claim admits it.
CREATE TABLE geste_queues (
    name               text PRIMARY KEY,
    concurrency        integer,          -- admitted and unfinished instances at most, cluster-wide; NULL: any
    worker_concurrency integer,          -- of those, admitted by one worker and running there; NULL: any
    rate_limit         integer,          -- admissions at most in any window of rate_period seconds; NULL: any
    rate_period        double precision,
    starts             double precision[] NOT NULL DEFAULT ARRAY[]::double precision[],  -- the admission times of the last window
    updated_at         double precision NOT NULL,
    partition_concurrency integer,       -- (22) admitted and unfinished instances at most per partition
    partition_rate_limit  integer        -- (22) admissions at most per partition in any window of rate_period
);
-- (22) a row per queue and partition key: the lock the claims of a partition take turns on (SKIP LOCKED),
-- and its rate window; '' (the starts without a key) made with the queue, a key's by its first start
CREATE TABLE geste_queue_partitions (
    queue  text NOT NULL,
    key    text NOT NULL,
    starts double precision[] NOT NULL DEFAULT ARRAY[]::double precision[],  -- the admission times of the last window
    PRIMARY KEY (queue, key)
);
-- the waiting line of a queue, in claim order (priority, then first come first served)
CREATE INDEX geste_instances_queued ON geste_instances (queue, priority, queued_at)
    WHERE queued_at IS NOT NULL AND status = 'pending';
-- the slots in use: admitted and unfinished (an end, whatever its path, changes the status), per
-- partition (22: the queue's count reads the prefix)
CREATE INDEX geste_instances_queue_admitted ON geste_instances (queue, partition_key)
    WHERE queue IS NOT NULL AND queued_at IS NULL
      AND status IN ('pending', 'running', 'waiting', 'compensating');
-- at most one unfinished instance per dedup id and queue
CREATE UNIQUE INDEX geste_instances_dedup ON geste_instances (queue, dedup_id)
    WHERE dedup_id IS NOT NULL AND status IN ('pending', 'running', 'waiting', 'compensating');
-- (22) each partition's waiting line, in claim order: the claim's loose scan of the partitions holding
-- queued work, and its keyset probes of each partition's next instance
CREATE INDEX geste_instances_queued_partition
    ON geste_instances (queue, partition_key, priority, queued_at, instance_id)
    WHERE queued_at IS NOT NULL AND status = 'pending';

-- The claim of a queue (20; partitions 22): the count of the slots in use runs in a snapshot taken after
-- the queue's row lock is held (each statement of a VOLATILE plpgsql function takes its own), so it is
-- exact; a partitioned queue's counts likewise, each after its partition's row lock (SKIP LOCKED).
-- (28) The admitting UPDATE finds its rows by primary key only: see 0028_queue_claim_by_key.sql.
CREATE FUNCTION geste_queue_claim(
    p_queue text, p_n integer, p_worker text, p_prefix text, p_now double precision,
    p_expires double precision
) RETURNS TABLE (
    instance_id text, lease_id text, workflow_name text, input text, status text,
    created_at double precision, cancel_requested boolean, run integer, steps integer,
    deadline double precision, run_at double precision
)
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
DECLARE
    v_limit integer;
    v_rate integer;
    v_period double precision;
    v_starts double precision[];
    v_plimit integer;
    v_prate integer;
    v_busy integer;
    v_taken integer;
    v_n integer := p_n;
    v_key text;
    v_room integer;
    v_pstarts double precision[];
    v_keys text[] := ARRAY[]::text[];
    v_rooms integer[] := ARRAY[]::integer[];
    v_last_priority integer[];
    v_last_queued double precision[];
    v_last_id text[];
    v_ids text[] := ARRAY[]::text[];
    v_id text;
    v_priority integer;
    v_queued double precision;
    v_i integer;
    v_more boolean;
    v_wait double precision;
    v_counted record;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM geste_instances AS i
                   WHERE i.queue = p_queue AND i.queued_at IS NOT NULL AND i.status = 'pending') THEN
        RETURN;
    END IF;
    SELECT q.concurrency, q.rate_limit, q.rate_period, q.partition_concurrency, q.partition_rate_limit
    INTO v_limit, v_rate, v_period, v_plimit, v_prate
    FROM geste_queues AS q WHERE q.name = p_queue;
    IF v_limit IS NOT NULL OR v_rate IS NOT NULL THEN
        SELECT q.concurrency, q.rate_limit, q.rate_period, q.starts, q.partition_concurrency,
               q.partition_rate_limit
        INTO v_limit, v_rate, v_period, v_starts, v_plimit, v_prate
        FROM geste_queues AS q WHERE q.name = p_queue FOR UPDATE;
    END IF;
    IF v_limit IS NOT NULL THEN
        SELECT count(*) INTO v_busy FROM (
            SELECT 1 FROM geste_instances AS i
            WHERE i.queue = p_queue AND i.queued_at IS NULL
              AND i.status IN ('pending', 'running', 'waiting', 'compensating')
            LIMIT v_limit) AS x;
        v_n := least(v_n, v_limit - v_busy);
    END IF;
    IF v_rate IS NOT NULL THEN
        v_starts := ARRAY(SELECT s FROM unnest(v_starts) AS s WHERE s > p_now - v_period ORDER BY s);
        IF cardinality(v_starts) >= v_rate THEN
            RETURN QUERY SELECT NULL::text, NULL::text, NULL::text, NULL::text, NULL::text,
                                NULL::double precision, NULL::boolean, NULL::integer, NULL::integer,
                                NULL::double precision,
                                v_starts[cardinality(v_starts) - v_rate + 1] + v_period;
            RETURN;
        END IF;
        v_n := least(v_n, v_rate - cardinality(v_starts));
    END IF;
    IF v_n <= 0 THEN
        RETURN;
    END IF;
    IF v_plimit IS NULL AND v_prate IS NULL THEN
        RETURN QUERY
        UPDATE geste_instances AS i
        SET locked_by = p_worker, lease_id = p_prefix || i.instance_id, lock_expires_at = p_expires,
            run_at = p_expires, status = 'running', queued_at = NULL, updated_at = p_now
        WHERE i.instance_id = ANY(ARRAY(
            SELECT w.instance_id FROM geste_instances AS w
            WHERE w.queue = p_queue AND w.queued_at IS NOT NULL AND w.status = 'pending'
            ORDER BY w.queue, w.priority, w.queued_at
            LIMIT v_n
            FOR UPDATE SKIP LOCKED))  -- (28) locked, and so still queued: the rows by key alone
        RETURNING i.instance_id, i.lease_id, i.workflow_name, i.input, i.status, i.created_at,
                  i.cancel_requested, i.run, i.steps, i.deadline, NULL::double precision;
        GET DIAGNOSTICS v_taken = ROW_COUNT;
    ELSE
        -- the partitions holding queued work, in the order of their heads
        FOR v_key IN
            WITH RECURSIVE parts(k) AS (
                (SELECT w.partition_key FROM geste_instances AS w
                 WHERE w.queue = p_queue AND w.queued_at IS NOT NULL AND w.status = 'pending'
                 ORDER BY w.partition_key LIMIT 1)
                UNION ALL
                SELECT (SELECT w.partition_key FROM geste_instances AS w
                        WHERE w.queue = p_queue AND w.queued_at IS NOT NULL AND w.status = 'pending'
                          AND w.partition_key > parts.k
                        ORDER BY w.partition_key LIMIT 1)
                FROM parts WHERE parts.k IS NOT NULL
            )
            SELECT parts.k FROM parts
            CROSS JOIN LATERAL (
                SELECT w.priority, w.queued_at FROM geste_instances AS w
                WHERE w.queue = p_queue AND w.partition_key = parts.k
                  AND w.queued_at IS NOT NULL AND w.status = 'pending'
                ORDER BY w.priority, w.queued_at LIMIT 1) AS head
            WHERE parts.k IS NOT NULL
            ORDER BY head.priority, head.queued_at, parts.k
        LOOP
            EXIT WHEN cardinality(v_keys) >= v_n;
            SELECT p.starts INTO v_pstarts FROM geste_queue_partitions AS p
            WHERE p.queue = p_queue AND p.key = v_key FOR UPDATE SKIP LOCKED;
            IF NOT FOUND THEN  -- held by another claimer, or not made yet (an instance not started by
                INSERT INTO geste_queue_partitions AS p (queue, key)  -- insert_queued): made here
                SELECT p_queue, v_key
                WHERE NOT EXISTS (SELECT 1 FROM geste_queue_partitions AS p
                                  WHERE p.queue = p_queue AND p.key = v_key)
                ON CONFLICT DO NOTHING;
                SELECT p.starts INTO v_pstarts FROM geste_queue_partitions AS p
                WHERE p.queue = p_queue AND p.key = v_key FOR UPDATE SKIP LOCKED;
                CONTINUE WHEN NOT FOUND;
            END IF;
            v_room := v_n;
            IF v_plimit IS NOT NULL THEN
                SELECT count(*) INTO v_busy FROM (
                    SELECT 1 FROM geste_instances AS i
                    WHERE i.queue = p_queue AND i.partition_key = v_key AND i.queued_at IS NULL
                      AND i.status IN ('pending', 'running', 'waiting', 'compensating')
                    LIMIT v_plimit) AS x;
                v_room := least(v_room, v_plimit - v_busy);
            END IF;
            IF v_prate IS NOT NULL THEN
                v_pstarts := ARRAY(SELECT s FROM unnest(v_pstarts) AS s WHERE s > p_now - v_period ORDER BY s);
                IF cardinality(v_pstarts) >= v_prate THEN
                    v_wait := least(v_wait, v_pstarts[cardinality(v_pstarts) - v_prate + 1] + v_period);
                END IF;
                v_room := least(v_room, v_prate - cardinality(v_pstarts));
            END IF;
            IF v_room > 0 THEN
                v_keys := v_keys || v_key;
                v_rooms := v_rooms || v_room;
            END IF;
        END LOOP;
        -- turns: one instance of each partition with room left per turn, its next in its line's order
        v_last_priority := array_fill((-2147483648)::integer, ARRAY[cardinality(v_keys)]);
        v_last_queued := array_fill('-Infinity'::double precision, ARRAY[cardinality(v_keys)]);
        v_last_id := array_fill(''::text, ARRAY[cardinality(v_keys)]);
        v_more := cardinality(v_keys) > 0;
        WHILE v_more AND cardinality(v_ids) < v_n LOOP
            v_more := false;
            FOR v_i IN 1 .. cardinality(v_keys) LOOP
                EXIT WHEN cardinality(v_ids) >= v_n;
                CONTINUE WHEN v_rooms[v_i] <= 0;
                SELECT w.instance_id, w.priority, w.queued_at INTO v_id, v_priority, v_queued
                FROM geste_instances AS w
                WHERE w.queue = p_queue AND w.partition_key = v_keys[v_i]
                  AND w.queued_at IS NOT NULL AND w.status = 'pending'
                  AND (w.priority, w.queued_at, w.instance_id)
                      > (v_last_priority[v_i], v_last_queued[v_i], v_last_id[v_i])
                ORDER BY w.priority, w.queued_at, w.instance_id LIMIT 1;
                IF NOT FOUND THEN
                    v_rooms[v_i] := 0;
                    CONTINUE;
                END IF;
                v_ids := v_ids || v_id;
                v_rooms[v_i] := v_rooms[v_i] - 1;
                v_last_priority[v_i] := v_priority;
                v_last_queued[v_i] := v_queued;
                v_last_id[v_i] := v_id;
                v_more := v_more OR v_rooms[v_i] > 0;
            END LOOP;
        END LOOP;
        RETURN QUERY
        UPDATE geste_instances AS i
        SET locked_by = p_worker, lease_id = p_prefix || i.instance_id, lock_expires_at = p_expires,
            run_at = p_expires, status = 'running', queued_at = NULL, updated_at = p_now
        WHERE i.instance_id = ANY(ARRAY(  -- (28) each pick locked by key, if it is still queued
            SELECT w.instance_id FROM unnest(v_ids) AS v(id) CROSS JOIN LATERAL (
                SELECT w.instance_id FROM geste_instances AS w
                WHERE w.instance_id = v.id AND w.queued_at IS NOT NULL AND w.status = 'pending'
                FOR UPDATE) AS w))
        RETURNING i.instance_id, i.lease_id, i.workflow_name, i.input, i.status, i.created_at,
                  i.cancel_requested, i.run, i.steps, i.deadline, NULL::double precision;
        GET DIAGNOSTICS v_taken = ROW_COUNT;
        IF v_prate IS NOT NULL AND v_taken > 0 THEN  -- each partition's window: its admissions now
            FOR v_counted IN
                SELECT i.partition_key AS k, count(*)::integer AS n FROM geste_instances AS i
                WHERE i.instance_id = ANY(v_ids) AND i.lease_id = p_prefix || i.instance_id
                GROUP BY i.partition_key
            LOOP
                UPDATE geste_queue_partitions AS p
                SET starts = ARRAY(SELECT s FROM unnest(p.starts) AS s WHERE s > p_now - v_period ORDER BY s)
                             || array_fill(p_now, ARRAY[v_counted.n])
                WHERE p.queue = p_queue AND p.key = v_counted.k
                RETURNING p.starts INTO v_pstarts;
                IF cardinality(v_pstarts) >= v_prate THEN
                    v_wait := least(v_wait, v_pstarts[cardinality(v_pstarts) - v_prate + 1] + v_period);
                END IF;
            END LOOP;
        END IF;
        IF v_wait IS NOT NULL AND v_taken < v_n AND v_rate IS NULL THEN
            RETURN QUERY SELECT NULL::text, NULL::text, NULL::text, NULL::text, NULL::text,
                                NULL::double precision, NULL::boolean, NULL::integer, NULL::integer,
                                NULL::double precision, v_wait;
        END IF;
    END IF;
    IF v_rate IS NOT NULL AND v_taken > 0 THEN
        v_starts := v_starts || array_fill(p_now, ARRAY[v_taken]);
        UPDATE geste_queues AS q SET starts = v_starts WHERE q.name = p_queue;
    END IF;
    IF v_rate IS NOT NULL AND (cardinality(v_starts) >= v_rate OR (v_wait IS NOT NULL AND v_taken < v_n)) THEN
        RETURN QUERY SELECT NULL::text, NULL::text, NULL::text, NULL::text, NULL::text,
                            NULL::double precision, NULL::boolean, NULL::integer, NULL::integer,
                            NULL::double precision,
                            CASE WHEN cardinality(v_starts) >= v_rate
                                 THEN least(v_starts[cardinality(v_starts) - v_rate + 1] + v_period, v_wait)
                                 ELSE v_wait END;
    END IF;
END
$$;

-- The awaited child's state in a fresh snapshot (21), read by the suspension at a child wait after it has
-- locked the parent's row (each statement of a VOLATILE plpgsql function takes its own snapshot).
CREATE FUNCTION geste_child_now(p_child text) RETURNS TABLE (
    workflow_name text, status text, result text, error text, parent_id text
)
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY SELECT i.workflow_name, i.status, i.result, i.error, i.parent_id
                 FROM geste_instances AS i WHERE i.instance_id = p_child;
END
$$;

-- Published state (25; docs/state.md): each value a workflow publishes under a key (ctx.set_state, a step),
-- numbered per (instance, key) from 1, written by the statement that records the step's history row.
-- Never updated: the history of values is kept; the latest is the highest version (a backward probe of
-- the primary key). Kept after the instance's end and across continue_as_new (versions go on).
CREATE TABLE geste_state (
    instance_id text NOT NULL,
    key         text NOT NULL,
    version     integer NOT NULL,           -- 1, 2, ... per (instance, key): wait_state(after=...) takes it
    value       text NOT NULL,              -- JSON
    run         integer NOT NULL,           -- the run that set it (continue_as_new)
    seq         integer NOT NULL,           -- the set_state step in that run's history
    created_at  double precision NOT NULL,
    PRIMARY KEY (instance_id, key, version)
);

-- Durable streams (26; docs/streams.md): one row per item of an instance's named stream, read in position
-- order from any position through the primary key. writer: the write's idempotency key, unique per stream
-- (a replay's or a retried activity's rewrite writes nothing); item NULL: the stream's close.
CREATE TABLE geste_streams (
    instance_id text NOT NULL,
    key         text NOT NULL,
    position    bigint NOT NULL,
    writer      text NOT NULL,
    item        text,                        -- JSON; NULL: the close
    written_at  double precision NOT NULL,
    PRIMARY KEY (instance_id, key, position)
);
CREATE UNIQUE INDEX geste_streams_by_writer ON geste_streams (instance_id, key, writer);
-- (26) each stream's next position and whether it is closed: a write batch locks its row, so a stream's
-- positions follow the order of its commits
CREATE TABLE geste_stream_heads (
    instance_id   text NOT NULL,
    key           text NOT NULL,
    next_position bigint NOT NULL,
    closed        boolean NOT NULL DEFAULT false,
    PRIMARY KEY (instance_id, key)
);
-- (26) the readers of another process waiting for a stream, registered only while they wait: a write batch
-- probes this by key and, when a row is there, notifies geste_stream_written after its commit (batched)
CREATE TABLE geste_stream_readers (
    instance_id text NOT NULL,
    key         text NOT NULL,
    reader      text NOT NULL,
    process     text NOT NULL,
    expires_at  double precision NOT NULL,
    PRIMARY KEY (instance_id, key, reader)
);
CREATE INDEX geste_stream_readers_by_expiry ON geste_stream_readers (expires_at);
