-- Every query of the PostgreSQL backend, by name. {schema} is replaced by the configured schema, quoted.
-- Single statements run as their own transaction: one round trip, one commit.
-- NOTIFYs (pg_notify) are sent inside the statement that makes the work claimable, so they reach the
-- listeners only if it commits, and only once the instance can be claimed. A parameter says whether
-- notifications are on (listen_notify); step commits (record) never notify, and ends (finish) only when a
-- result() call of another process waits for the instance (geste_result_waiters, schema 14).
-- Routing (schema 13, docs/design.md "Wake-ups"): a payload that makes an instance runnable also names the
-- worker that should claim it ("worker": the instance's last_worker, NULL for a new one; the listeners
-- route a NULL or dead one by a hash over the live workers), a worker that must not ("avoid": one that
-- gave the instance back), and the schema ({schema_name}), so that the listeners of other schemas of
-- the database (channels are per database) ignore it.

-- name: list_tables
SELECT table_name AS name FROM information_schema.tables
WHERE table_schema = $1 AND table_name LIKE 'geste%';

-- name: get_meta
SELECT value FROM {schema}.geste_meta WHERE key = $1;

-- name: set_meta
INSERT INTO {schema}.geste_meta (key, value) VALUES ($1, $2)
ON CONFLICT (key) DO UPDATE SET value = excluded.value;

-- name: insert_instance
-- Concurrent starts of one id: ON CONFLICT waits for the other insert and then does nothing.
-- event_floor: a value drawn from the events' sequence, so the instance sees exactly the events that draw
-- their seq after it (the database decides, not the clocks of the starter and the sender).
-- Created under a lease (a local start, run at once): its run_at is the lease's expiry, its take-over
-- time, as a claim sets it (schema 11).
WITH inserted AS (
    INSERT INTO {schema}.geste_instances
        (instance_id, workflow_name, status, input, created_at, updated_at, run_at,
         locked_by, lease_id, lock_expires_at, event_floor, deadline, version, pinned, trace_context)
    VALUES ($1, $2, $3, $4, $5, $5, CASE WHEN $7::text IS NULL THEN LEAST($5, {db_clock}) ELSE $8 END,
            $6, $7, $8, nextval('{schema}.geste_events_seq_seq'), $10, $11, $12, $13)
    ON CONFLICT (instance_id) DO NOTHING
    RETURNING instance_id, workflow_name, status, input, result, error, created_at, updated_at, finished_at,
              run_at, locked_by, lock_expires_at, cancel_requested, steps, runner
), notified AS (  -- a new instance nobody holds: a worker elsewhere may take it at once
    SELECT pg_notify('geste_workflow_resumable',
                     json_build_object('instance_id', $1::text, 'workflow_name', coalesce(runner, $2::text),
                                       'worker', NULL,
                                       'schema', {schema_name})::text)
    FROM inserted WHERE $9 AND $7::text IS NULL
)
SELECT true AS created, *, (SELECT count(*) FROM notified) AS notified FROM inserted
UNION ALL
SELECT false, instance_id, workflow_name, status, input, result, error, created_at, updated_at, finished_at,
       run_at, locked_by, lock_expires_at, cancel_requested, steps, runner, 0
FROM {schema}.geste_instances WHERE instance_id = $1 AND NOT EXISTS (SELECT 1 FROM inserted);

-- name: transaction_isolation
-- The isolation of a caller's transaction (docs/transactions.md): an event or a message is written there
-- only under read committed, where the statement after a lock sees what committed before it was granted.
SELECT current_setting('transaction_isolation');

-- name: database_clock
-- The database's own time (Unix seconds): a worker compares its clock with it at start.
SELECT {db_clock} AS now;

-- name: get_instance
SELECT instance_id, workflow_name, status, input, result, error, created_at, updated_at, finished_at,
       run_at, locked_by, lock_expires_at, cancel_requested, steps, run, last_worker, parent_id,
       parent_close, deadline
FROM {schema}.geste_instances WHERE instance_id = $1;

-- name: watch_result
-- A result() call ($2, its own id; $3 the worker id of its process) waits for an instance that another
-- process may end: its row, so that the end notifies it (14). Written only while the instance has not
-- ended (as this statement's snapshot sees it), renewed ($4, the new expiry) when it is there already. A
-- plain read of geste_instances: no lock on the instance's row, which a claim must never find locked.
-- The caller reads the instance again after this commits, so an end that committed before the row was
-- there is seen by that read; an end that commits after is told (docs/design.md, the race).
INSERT INTO {schema}.geste_result_waiters (instance_id, waiter, process, expires_at)
SELECT $1, $2, $3, $4
WHERE EXISTS (SELECT 1 FROM {schema}.geste_instances
              WHERE instance_id = $1 AND status NOT IN ('completed', 'failed', 'cancelled'))
ON CONFLICT (instance_id, waiter) DO UPDATE SET expires_at = excluded.expires_at
RETURNING true AS watched;

-- name: unwatch_results
-- result() calls that stopped waiting (a timeout, a cancellation, the App closing, an end found by a
-- read): their rows, by key ($1 instance ids, $2 waiters).
DELETE FROM {schema}.geste_result_waiters w
USING unnest($1::text[], $2::text[]) AS u(instance_id, waiter)
WHERE w.instance_id = u.instance_id AND w.waiter = u.waiter;

-- name: result_waiters_cleanup
-- The cleanup chore: at most $2 rows of result() calls whose waiter stopped renewing them before $1 (it
-- died), oldest first, through geste_result_waiters_by_expiry: the rows read are the rows deleted.
WITH expired AS (
    SELECT instance_id, waiter FROM {schema}.geste_result_waiters
    WHERE expires_at < $1 ORDER BY expires_at LIMIT $2
), gone AS (
    DELETE FROM {schema}.geste_result_waiters w USING expired e
    WHERE w.instance_id = e.instance_id AND w.waiter = e.waiter
    RETURNING 1
)
SELECT count(*) FROM gone;

-- name: list_instances
SELECT instance_id, workflow_name, status, input, result, error, created_at, updated_at, finished_at,
       run_at, locked_by, lock_expires_at, cancel_requested, steps, run, parent_id, deadline
FROM {schema}.geste_instances
WHERE ($1::text IS NULL OR workflow_name = $1) AND ($2::text IS NULL OR status = $2)
ORDER BY created_at DESC, instance_id DESC
LIMIT $3 OFFSET $4;

-- name: replay_instances
-- The replay check's read (read_histories): list_instances without the columns added since schema 1, so
-- that a database of an older schema is read too (a copy of production checked before its upgrade). An
-- instance's input and history are those of its current run, whatever its run number.
SELECT instance_id, workflow_name, status, input, result, error, created_at, updated_at, finished_at,
       run_at, locked_by, lock_expires_at, cancel_requested, steps
FROM {schema}.geste_instances
WHERE ($1::text IS NULL OR workflow_name = $1) AND ($2::text IS NULL OR status = $2)
ORDER BY created_at DESC, instance_id DESC
LIMIT $3 OFFSET $4;

-- name: get_history
SELECT seq, kind, name, payload, is_error, created_at
FROM {schema}.geste_history WHERE instance_id = $1 ORDER BY seq;

-- name: history_after
-- The rows of an instance's current run after step $2: a claim's catch-up (`claim`, read in a snapshot that
-- can miss the rows whose commit it waited for; PostgreSQL's primary key range).
SELECT seq, kind, name, payload, is_error, created_at
FROM {schema}.geste_history WHERE instance_id = $1 AND seq > $2 ORDER BY seq;

-- name: insert_history
INSERT INTO {schema}.geste_history (instance_id, seq, kind, name, payload, is_error, created_at)
SELECT $1, * FROM unnest($2::integer[], $3::text[], $4::text[], $5::text[], $6::boolean[],
                         $7::double precision[]);

-- name: cancel_unstarted
-- An instance that never ran ends at once. Its result() waiters (14) go with it; those of other processes
-- are told, as by finish (the canceller's own are woken in memory, and by the notification too).
WITH cancelled AS (
    UPDATE {schema}.geste_instances
    SET status = 'cancelled', cancel_requested = true, run_at = NULL, finished_at = $2, updated_at = $2
    WHERE instance_id = $1 AND status = 'pending' AND lease_id IS NULL
    RETURNING instance_id, workflow_name, parent_id
), parent AS (  -- (16) a child cancelled before it ran: its waiting parent is made runnable, as by finish
    UPDATE {schema}.geste_instances p
    SET run_at = CASE WHEN p.lease_id IS NULL AND p.status = 'waiting' THEN LEAST(p.run_at, $2, {db_clock})
                      ELSE p.run_at END
    FROM cancelled c WHERE p.instance_id = c.parent_id
    RETURNING p.instance_id, p.workflow_name, p.runner, p.last_worker,
              p.lease_id IS NULL AND p.status = 'waiting' AS woken
), parent_notified AS (
    SELECT pg_notify('geste_workflow_resumable',
                     json_build_object('instance_id', instance_id,
                                       'workflow_name', coalesce(runner, workflow_name),
                                       'worker', last_worker, 'schema', {schema_name})::text)
    FROM parent WHERE $3 AND woken
), awaited AS (
    DELETE FROM {schema}.geste_result_waiters
    WHERE instance_id = $1 AND EXISTS (SELECT 1 FROM cancelled)
    RETURNING process
), notified AS (
    SELECT pg_notify('geste_workflow_resumable',
                     json_build_object('instance_id', instance_id, 'workflow_name', workflow_name,
                                       'finished', 'cancelled', 'schema', {schema_name})::text)
    FROM cancelled WHERE $3 AND EXISTS (SELECT 1 FROM awaited)
)
SELECT (SELECT count(*) FROM cancelled) AS cancelled,
       (SELECT count(*) FROM notified) + (SELECT count(*) FROM parent_notified) AS notified;

-- name: flag_cancel
-- A waiting instance is woken (and notified). A held one's holder is told at once ('cancel': true, routed
-- to locked_by, schema 17: it cancels the running activities), else at its next renewal or step commit.
-- Runnable "now" is the earlier of the caller's clock and the database's ({db_clock}): a caller whose
-- clock runs ahead of the workers' must not make them wait. LEAST ignores a NULL run_at. A held instance's
-- run_at (its take-over time, schema 11) is left as it is: its holder goes on, or its lease runs out.
WITH flagged AS (
    UPDATE {schema}.geste_instances
    SET cancel_requested = true, updated_at = $2,
        run_at = CASE WHEN lease_id IS NULL THEN LEAST(run_at, $2, {db_clock}) ELSE run_at END
    WHERE instance_id = $1 AND status IN ('pending', 'running', 'waiting', 'compensating')
    RETURNING instance_id, workflow_name, runner, lease_id, last_worker, locked_by
)
SELECT count(CASE WHEN lease_id IS NULL
                  THEN pg_notify('geste_workflow_resumable',
                                 json_build_object('instance_id', instance_id,
                                                   'workflow_name', coalesce(runner, workflow_name),
                                                   'worker', last_worker, 'schema', {schema_name})::text)
                  ELSE pg_notify('geste_workflow_resumable',
                                 json_build_object('instance_id', instance_id, 'workflow_name', workflow_name,
                                                   'worker', locked_by, 'cancel', true,
                                                   'schema', {schema_name})::text)
             END) AS notified
FROM flagged WHERE $3;

-- Operator actions (app.retry, app.resume): one transaction each, which first locks the instance's row
-- (lock_instance). Its later statements take their snapshot after the lock was granted, so of two
-- operators acting at once the second waits, then sees the first's work.

-- name: lock_instance
SELECT instance_id, workflow_name, status, input, result, error, created_at, updated_at, finished_at,
       run_at, locked_by, lock_expires_at, cancel_requested, steps
FROM {schema}.geste_instances WHERE instance_id = $1 FOR UPDATE;

-- name: retry_instance
-- A failed instance (checked under lock_instance) runs again from its failed step $4 (base.retry_cut, on
-- the history read after the lock): the rows from it on move to geste_retries with the error; it is
-- runnable now, held by nobody, status 'waiting' (not 'pending': a cancel would end a pending instance at
-- once, without the compensations its replayed steps register), and notified.
WITH cut AS (
    SELECT $4::integer AS from_seq
), removed AS (
    DELETE FROM {schema}.geste_history h USING cut
    WHERE h.instance_id = $1 AND h.seq >= cut.from_seq
    RETURNING h.seq, h.kind, h.name, h.payload, h.is_error, h.created_at
), archived AS (
    INSERT INTO {schema}.geste_retries (instance_id, retry, retried_at, from_seq, error, failed_at, removed)
    SELECT i.instance_id,
           COALESCE((SELECT max(r.retry) FROM {schema}.geste_retries r WHERE r.instance_id = $1), 0) + 1,
           $2, cut.from_seq, i.error, i.finished_at,
           COALESCE((SELECT json_agg(json_build_array(seq, kind, name, payload, is_error, created_at)
                                     ORDER BY seq)
                     FROM removed)::text, '[]')
    FROM {schema}.geste_instances i, cut
    WHERE i.instance_id = $1 AND i.status = 'failed'
    RETURNING retry, from_seq, removed
), reopened AS (
    UPDATE {schema}.geste_instances
    SET status = 'waiting', result = NULL, error = NULL, finished_at = NULL, run_at = LEAST($2, {db_clock}),
        updated_at = $2,
        steps = steps - (SELECT count(*) FROM removed)
    WHERE instance_id = $1 AND status = 'failed'
    RETURNING instance_id, workflow_name, runner, last_worker
), notified AS (
    SELECT pg_notify('geste_workflow_resumable',
                     json_build_object('instance_id', instance_id,
                                       'workflow_name', coalesce(runner, workflow_name),
                                       'worker', last_worker, 'schema', {schema_name})::text)
    FROM reopened WHERE $3
)
SELECT retry, from_seq, removed, (SELECT count(*) FROM notified) AS notified FROM archived;

-- name: last_retry
SELECT retry, retried_at FROM {schema}.geste_retries WHERE instance_id = $1 ORDER BY retry DESC LIMIT 1;

-- name: list_retries
SELECT instance_id, retry, retried_at, from_seq, error, failed_at, removed
FROM {schema}.geste_retries WHERE instance_id = $1 ORDER BY retry;

-- name: worker_liveness
SELECT heartbeat_at, stopped_at, lock_timeout FROM {schema}.geste_workers WHERE worker_id = $1;

-- name: resume
-- Runnable now (an earlier run_at is kept); with $3 the lease goes too: its holder's next write names a
-- lease_id that is gone, so it stops without writing (LeaseLost). Notified once nobody holds it. A
-- queued instance (schema 20) stays queued: only its queue's claim admits it.
WITH resumed AS (
    UPDATE {schema}.geste_instances
    SET locked_by = CASE WHEN $3 THEN NULL ELSE locked_by END,
        lease_id = CASE WHEN $3 THEN NULL ELSE lease_id END,
        lock_expires_at = CASE WHEN $3 THEN NULL ELSE lock_expires_at END,
        run_at = CASE WHEN queued_at IS NOT NULL THEN run_at
                      WHEN $3 THEN LEAST($2, {db_clock}) ELSE LEAST(run_at, $2, {db_clock}) END,
        updated_at = $2
    WHERE instance_id = $1
    RETURNING instance_id, workflow_name, runner, lease_id, lock_expires_at, last_worker
)
SELECT count(pg_notify('geste_workflow_resumable',
                       json_build_object('instance_id', instance_id,
                                         'workflow_name', coalesce(runner, workflow_name),
                                         'worker', last_worker, 'schema', {schema_name})::text))
       AS notified
FROM resumed WHERE $4 AND (lease_id IS NULL OR lock_expires_at <= $2);

-- name: claim
-- The claim of a worker that registers one workflow ($7, a name), the common case; `claim_names` is the
-- same for several. FOR UPDATE SKIP LOCKED: concurrent claimers take disjoint sets without waiting on
-- each other. Each claimed instance comes back with its history, so a wake-up costs one round trip, not
-- two: an array per column (h_seq, ...; NULL for none), which the server builds without escaping anything
-- and asyncpg reads in C, three times sooner than the JSON it replaces (json_agg: 30 ms of server time
-- for 6,000 rows). The sorted subquery gives the arrays in seq order (checked by the reader). One more
-- row, with a NULL instance_id, is no claim: its run_at is the next one after $6 among free instances
-- (read in the same snapshot, so the instances just picked, still free there, are not counted), for the
-- worker's sleep.
-- expired_at: when the previous lease of an instance taken over (expired, not released) ran out; else NULL.
-- run_at: when it became runnable (the value before this claim, which moves it: see below).
-- Two ranges of the name, each locked as it is read (schema 11): the leases that ran out
-- (geste_instances_leased_by_name, up to run_at <= $3: a held instance's run_at is its take-over time,
-- the lease's expiry as of its claim or its worker's last heartbeat, so live leases are past the range
-- and never read), taken first, so that a backlog never starves the take-over of a dead worker's
-- instances; then the free instances due (geste_instances_runnable_by_name, which holds no held row), as
-- many as are left of $5. Each range reads what it takes (plus rows another claim locks), however many
-- instances of other workflows are due and however many leases are held. Both are limited by $5 itself,
-- a constant to the planner (with "$5 - count(expired)" it guessed a tenth of the range and sorted the
-- whole range of a backlog): a claim that takes over k leases may lock k free rows it leaves, skipped by
-- a concurrent claim for the length of this statement, only while leases run out. A claimed instance's
-- run_at becomes its lease's expiry ($4): it leaves the free index for the leased one, past its range.
-- Two planner details, each measured on a million finished instances: the partial indexes hold the
-- statuses a claim takes (without, the planner, which sees those statuses as rare, joined the status
-- index's bitmap to the range and sorted it); each run_at range also has a constant bound on its open
-- side (run_at > '-Infinity', < 'Infinity'): a range bounded by a parameter on one side only is
-- guessed at a third of the rows, which made the generic plan look seven times dearer than the custom
-- ones, and the statement was planned again at every call (0.46 ms a round instead of 0.16); as a
-- two-sided range it is guessed at 0.5 %.
-- The planner cannot tell how many rows a name has (it is a parameter): with "workflow_name = $7 ORDER BY
-- run_at" it walked an index on run_at (schema 8 had one), filtering on the name, through every due
-- instance of the other workflows before the first of this one. So the name is matched with = ANY(ARRAY[..])
-- (no equivalence class: the ORDER BY keeps workflow_name) and the order is (workflow_name, run_at), which
-- only the two partial indexes give, whatever other index a later schema adds. The UPDATE finds its rows
-- by key (= ANY(ARRAY(..))), not by a join whose size a generic plan guesses from LIMIT $5 (a hash join
-- over the whole table).
WITH expired AS (
    SELECT instance_id, run_at, lock_expires_at AS expired_at
    FROM {schema}.geste_instances
    WHERE coalesce(runner, workflow_name) = ANY(ARRAY[$7::text]) AND lease_id IS NOT NULL
      AND run_at <= $3 AND run_at > '-Infinity'
      AND lock_expires_at <= $3 AND status IN ('pending', 'running', 'waiting', 'compensating')
    ORDER BY coalesce(runner, workflow_name), run_at
    LIMIT $5
    FOR UPDATE SKIP LOCKED
), free AS (
    SELECT instance_id, run_at, NULL::double precision AS expired_at
    FROM {schema}.geste_instances
    WHERE coalesce(runner, workflow_name) = ANY(ARRAY[$7::text]) AND lease_id IS NULL
      AND run_at <= $6 AND run_at > '-Infinity'
      AND status IN ('pending', 'running', 'waiting', 'compensating')
    ORDER BY coalesce(runner, workflow_name), run_at
    LIMIT $5
    FOR UPDATE SKIP LOCKED
), picked AS (
    SELECT * FROM expired
    UNION ALL
    (SELECT * FROM free ORDER BY run_at LIMIT $5 - (SELECT count(*) FROM expired))
), claimed AS (
    UPDATE {schema}.geste_instances AS i
    SET locked_by = $1,
        lease_id = $2 || i.instance_id,
        lock_expires_at = $4,
        run_at = $4,
        status = CASE WHEN i.status IN ('pending', 'waiting') THEN 'running' ELSE i.status END,
        updated_at = $3
    WHERE i.instance_id = ANY(ARRAY(SELECT instance_id FROM picked))
    RETURNING i.instance_id, i.lease_id, i.workflow_name, i.input, i.status, i.created_at, i.cancel_requested,
              i.run, i.steps, i.deadline, i.awaits, i.runner
)
(SELECT c.*, p.run_at, p.expired_at, h.*, aw.*
 FROM claimed c JOIN picked p ON p.instance_id = c.instance_id
 CROSS JOIN LATERAL (  -- the rows after the step the worker knows ($8: instance: step), column by column
     SELECT array_agg(x.seq) AS h_seq, array_agg(x.kind) AS h_kind, array_agg(x.name) AS h_name,
            array_agg(x.payload) AS h_payload, array_agg(x.is_error) AS h_error, array_agg(x.created_at) AS h_at
     FROM (SELECT * FROM {schema}.geste_history
           WHERE instance_id = c.instance_id AND seq > coalesce(($8::jsonb ->> c.instance_id)::integer, 0)
           ORDER BY seq) AS x
 ) AS h
 LEFT JOIN LATERAL (  -- (21) the child it suspended to await, by its key (the reader keeps it if it ended)
     SELECT a.workflow_name AS a_workflow, a.status AS a_status, a.result AS a_result, a.error AS a_error,
            a.parent_id AS a_parent
     FROM {schema}.geste_instances AS a WHERE a.instance_id = c.awaits
 ) AS aw ON true
 ORDER BY p.run_at)
UNION ALL
SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
       (SELECT run_at FROM {schema}.geste_instances
        WHERE coalesce(runner, workflow_name) = ANY(ARRAY[$7::text]) AND run_at > $6 AND run_at < 'Infinity'
          AND lease_id IS NULL
          AND status IN ('pending', 'running', 'waiting', 'compensating')
        ORDER BY coalesce(runner, workflow_name), run_at LIMIT 1),
       NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL;

-- name: claim_names
-- `claim` for a worker that registers several workflows ($7, their names), with the same result. Per
-- name, the heads of its two ranges (the leases that ran out, the free instances due: see `claim`), at
-- most $5 rows each, read without a lock; then the earliest $5 of all ("wanted"), which alone are locked,
-- SKIP LOCKED, their conditions checked again under the lock, and taken. It reads at most 2 x $5 rows per
-- name, however many instances of other workflows are due and however many leases are held, and locks no
-- row it does not take: a wanted row skipped is one another claim is taking, so a concurrent claimer
-- never comes back short because of rows locked and then left (locking a head per name and keeping the
-- earliest did that). The names come through geste_names (schema 9), a set function the planner counts
-- as one row: through unnest it counts ten, which made every generic plan look ten times dearer than a
-- custom one, and the statement was planned again at every call. The run_at ranges have a constant
-- bound on their open side, as in `claim`.
WITH heads AS (
    SELECT h.instance_id, h.run_at
    FROM {schema}.geste_names($7::text[]) AS n(name)
    CROSS JOIN LATERAL (
        (SELECT instance_id, run_at
         FROM {schema}.geste_instances
         WHERE coalesce(runner, workflow_name) = ANY(ARRAY[n.name]) AND lease_id IS NOT NULL
           AND run_at <= $3 AND run_at > '-Infinity'
           AND lock_expires_at <= $3 AND status IN ('pending', 'running', 'waiting', 'compensating')
         ORDER BY coalesce(runner, workflow_name), run_at
         LIMIT $5)
        UNION ALL
        (SELECT instance_id, run_at
         FROM {schema}.geste_instances
         WHERE coalesce(runner, workflow_name) = ANY(ARRAY[n.name]) AND lease_id IS NULL
           AND run_at <= $6 AND run_at > '-Infinity'
           AND status IN ('pending', 'running', 'waiting', 'compensating')
         ORDER BY coalesce(runner, workflow_name), run_at
         LIMIT $5)
    ) AS h
), wanted AS MATERIALIZED (
    SELECT instance_id FROM heads ORDER BY run_at LIMIT $5
), picked AS (
    SELECT instance_id, run_at, CASE WHEN lease_id IS NOT NULL THEN lock_expires_at END AS expired_at
    FROM {schema}.geste_instances
    WHERE instance_id = ANY(ARRAY(SELECT instance_id FROM wanted))
      AND run_at <= $6 AND (lease_id IS NULL OR lock_expires_at <= $3)
      AND status IN ('pending', 'running', 'waiting', 'compensating')
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE {schema}.geste_instances AS i
    SET locked_by = $1,
        lease_id = $2 || i.instance_id,
        lock_expires_at = $4,
        run_at = $4,
        status = CASE WHEN i.status IN ('pending', 'waiting') THEN 'running' ELSE i.status END,
        updated_at = $3
    WHERE i.instance_id = ANY(ARRAY(SELECT instance_id FROM picked))
    RETURNING i.instance_id, i.lease_id, i.workflow_name, i.input, i.status, i.created_at, i.cancel_requested,
              i.run, i.steps, i.deadline, i.awaits, i.runner
)
(SELECT c.*, p.run_at, p.expired_at, h.*, aw.*
 FROM claimed c JOIN picked p ON p.instance_id = c.instance_id
 CROSS JOIN LATERAL (  -- the rows after the step the worker knows ($8: instance: step), column by column
     SELECT array_agg(x.seq) AS h_seq, array_agg(x.kind) AS h_kind, array_agg(x.name) AS h_name,
            array_agg(x.payload) AS h_payload, array_agg(x.is_error) AS h_error, array_agg(x.created_at) AS h_at
     FROM (SELECT * FROM {schema}.geste_history
           WHERE instance_id = c.instance_id AND seq > coalesce(($8::jsonb ->> c.instance_id)::integer, 0)
           ORDER BY seq) AS x
 ) AS h
 LEFT JOIN LATERAL (  -- (21) the child it suspended to await, by its key (the reader keeps it if it ended)
     SELECT a.workflow_name AS a_workflow, a.status AS a_status, a.result AS a_result, a.error AS a_error,
            a.parent_id AS a_parent
     FROM {schema}.geste_instances AS a WHERE a.instance_id = c.awaits
 ) AS aw ON true
 ORDER BY p.run_at)
UNION ALL
SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, min(n.run_at),
       NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL
FROM {schema}.geste_names($7::text[]) AS w(name)
CROSS JOIN LATERAL (
    SELECT run_at FROM {schema}.geste_instances
    WHERE coalesce(runner, workflow_name) = ANY(ARRAY[w.name]) AND run_at > $6 AND run_at < 'Infinity' AND lease_id IS NULL
      AND status IN ('pending', 'running', 'waiting', 'compensating')
    ORDER BY coalesce(runner, workflow_name), run_at LIMIT 1
) AS n;

-- name: claim_ids
-- A routed wake-up (schema 13): the instances a notification, a local timer or a forward gave this worker
-- ($7, their ids), of the workflows it registers ($8), taken like `claim` takes them (due by $6 and free,
-- or held by a lease that ran out at $3; a status this version knows; FOR UPDATE SKIP LOCKED: an instance
-- another claim is taking is skipped). The named rows are read once, by primary key ("named"), and
-- everything else works on them or on their keys (= ANY(ARRAY(..))): no plan can read another row, such
-- as the runnable index's range of the workflow (a custom plan did, for the rows not due yet). After the
-- claimed rows, one row per named instance nobody holds that is not due yet (a clock behind the
-- database's, a timer rung early), with its run_at and no lease_id: the worker's local timer; nothing for
-- the others (taken by another worker, finished, or waiting with no run_at: nothing to do). run_at of a
-- claimed row is the value it had; the UPDATE makes it the lease's expiry ($4), the take-over time, as
-- `claim` does (schema 11).
WITH named AS MATERIALIZED (
    SELECT instance_id, coalesce(runner, workflow_name) AS runner, status, run_at, lease_id
    FROM {schema}.geste_instances WHERE instance_id = ANY($7::text[])
), picked AS (
    SELECT instance_id, run_at, CASE WHEN lease_id IS NOT NULL THEN lock_expires_at END AS expired_at
    FROM {schema}.geste_instances
    WHERE instance_id = ANY(ARRAY(SELECT instance_id FROM named WHERE runner = ANY($8::text[])))
      AND ((lease_id IS NULL AND run_at <= $6) OR (lease_id IS NOT NULL AND lock_expires_at <= $3))
      AND status IN ('pending', 'running', 'waiting', 'compensating')
    ORDER BY run_at
    LIMIT $5
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE {schema}.geste_instances AS i
    SET locked_by = $1,
        lease_id = $2 || i.instance_id,
        lock_expires_at = $4,
        run_at = $4,
        status = CASE WHEN i.status IN ('pending', 'waiting') THEN 'running' ELSE i.status END,
        updated_at = $3
    WHERE i.instance_id = ANY(ARRAY(SELECT instance_id FROM picked))
    RETURNING i.instance_id, i.lease_id, i.workflow_name, i.input, i.status, i.created_at, i.cancel_requested,
              i.run, i.steps, i.deadline, i.awaits, i.runner
)
(SELECT c.*, p.run_at, p.expired_at, h.*, aw.*
 FROM claimed c JOIN picked p ON p.instance_id = c.instance_id
 CROSS JOIN LATERAL (  -- the rows after the step the worker knows ($9: instance: step), column by column
     SELECT array_agg(x.seq) AS h_seq, array_agg(x.kind) AS h_kind, array_agg(x.name) AS h_name,
            array_agg(x.payload) AS h_payload, array_agg(x.is_error) AS h_error, array_agg(x.created_at) AS h_at
     FROM (SELECT * FROM {schema}.geste_history
           WHERE instance_id = c.instance_id AND seq > coalesce(($9::jsonb ->> c.instance_id)::integer, 0)
           ORDER BY seq) AS x
 ) AS h
 LEFT JOIN LATERAL (  -- (21) the child it suspended to await, by its key (the reader keeps it if it ended)
     SELECT a.workflow_name AS a_workflow, a.status AS a_status, a.result AS a_result, a.error AS a_error,
            a.parent_id AS a_parent
     FROM {schema}.geste_instances AS a WHERE a.instance_id = c.awaits
 ) AS aw ON true
 ORDER BY p.run_at)
UNION ALL
SELECT instance_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, run_at,
       NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL
FROM named
WHERE runner = ANY($8::text[]) AND run_at > $6 AND lease_id IS NULL
  AND status IN ('pending', 'running', 'waiting', 'compensating');

-- name: route_wakeups
-- A worker that cannot take the instances routed to it (full, or stopping) hands them on, once: one
-- geste_workflow_resumable per instance ($1 ids, $2 what each is routed by: coalesce(runner,
-- workflow_name), as the notification or the claim that brought it here gave it), naming it as the worker
-- to avoid ($3), so that the listeners route each to another live worker (schema 13).
SELECT count(pg_notify('geste_workflow_resumable',
                       json_build_object('instance_id', r.instance_id, 'workflow_name', r.workflow_name,
                                         'worker', NULL, 'avoid', $3::text, 'forwarded', true,
                                         'schema', {schema_name})::text)) AS notified
FROM unnest($1::text[], $2::text[]) AS r(instance_id, workflow_name);

-- name: hand_on_queue
-- A worker whose claim of a queue took all it asked for and left it full hands the queue's backlog on,
-- once: one geste_workflow_resumable naming the queue, a key to route by ($2: spreads the hand-ons) and
-- this worker as the one to avoid ($3), so that the listeners route it to another live worker serving
-- the queue (schema 23), which claims it.
SELECT pg_notify('geste_workflow_resumable',
                 json_build_object('queue', $1::text, 'instance_id', $2::text, 'avoid', $3::text,
                                   'schema', {schema_name})::text);

-- name: renew
-- The heartbeat's renewal of every lease a worker holds: its rows are locked in instance_id order, as
-- record_batch and finish_batch lock theirs, so the worker's renewal and its group commits (which touch
-- the same rows) never deadlock. A held instance's take-over time (its run_at, schema 11) moves to the
-- new expiry when it is before $4 (half a lease ahead): so it stays past the claims' range while the
-- worker lives, and changes (an indexed column: not a HOT update) at most every other heartbeat. Step
-- commits renew lock_expires_at only, which no index holds. Each row kept says whether a cancel is
-- requested (schema 17's cancel of a running activity: the holder learns of it here on every backend).
-- Heartbeats (schema 18): $5 holds, per lease, the instance's activity heartbeat details (a JSON object)
-- when new ones were given since the last renewal, else NULL (the column is kept): no statement of its
-- own, and fenced like the renewal.
WITH locked AS (
    SELECT i.instance_id, l.heartbeats FROM {schema}.geste_instances i
    JOIN unnest($2::text[], $3::text[], $5::text[]) AS l(instance_id, lease_id, heartbeats)
        ON i.instance_id = l.instance_id AND i.lease_id = l.lease_id
    ORDER BY i.instance_id
    FOR UPDATE OF i
)
UPDATE {schema}.geste_instances AS i
SET lock_expires_at = $1, run_at = CASE WHEN i.run_at IS NULL OR i.run_at < $4 THEN $1 ELSE i.run_at END,
    heartbeats = COALESCE(locked.heartbeats, i.heartbeats)
FROM locked
WHERE i.instance_id = locked.instance_id
RETURNING i.instance_id, i.cancel_requested;

-- name: heartbeats
-- The heartbeat details recorded for an instance's running activities (schema 18), by primary key: read
-- by the first attempt of an activity with a heartbeat_timeout.
SELECT heartbeats FROM {schema}.geste_instances WHERE instance_id = $1;

-- name: release
-- Leases given back with work left: resumable now (notified after the release commits), or at $1. The
-- releaser is the instance's last worker; a release for now (a worker stopping, a run abandoned) asks
-- the others to take it ("avoid": the releaser), one for later is the releaser's own timer ("worker").
WITH released AS (
    UPDATE {schema}.geste_instances AS i
    SET locked_by = NULL, lease_id = NULL, lock_expires_at = NULL, run_at = $1, updated_at = $2,
        last_worker = i.locked_by
    FROM unnest($3::text[], $4::text[]) AS l(instance_id, lease_id)
    WHERE i.instance_id = l.instance_id AND i.lease_id = l.lease_id
    RETURNING i.instance_id, coalesce(i.runner, i.workflow_name) AS runner, i.last_worker
)
SELECT count(CASE WHEN $1 <= $2
                  THEN pg_notify('geste_workflow_resumable',
                                 json_build_object('instance_id', instance_id, 'workflow_name', runner,
                                                   'worker', NULL, 'avoid', last_worker,
                                                   'schema', {schema_name})::text)
                  ELSE pg_notify('geste_timer_expired',
                                 json_build_object('instance_id', instance_id, 'timer_id', NULL,
                                                   'expires_at', $1, 'workflow_name', runner,
                                                   'worker', last_worker, 'schema', {schema_name})::text)
             END) AS notified
FROM released WHERE $5;

-- name: record
-- A step commit in one statement: prove the lease is ours and renew it, then append the rows.
WITH lease AS (
    UPDATE {schema}.geste_instances
    SET lock_expires_at = $3, updated_at = $4, steps = steps + cardinality($5::integer[]),
        status = COALESCE($11, status)
    WHERE instance_id = $1 AND lease_id = $2
    RETURNING cancel_requested
), rows AS (
    INSERT INTO {schema}.geste_history (instance_id, seq, kind, name, payload, is_error, created_at)
    SELECT $1, r.* FROM unnest($5::integer[], $6::text[], $7::text[], $8::text[], $9::boolean[],
                               $10::double precision[]) AS r
    WHERE EXISTS (SELECT 1 FROM lease)
)
SELECT cancel_requested FROM lease;

-- name: record_batch
-- Group commit: the step commits of several instances (each with its own lease) in one statement, each
-- instance once (the storage merges an instance's commits under one lease first: an UPDATE ... FROM
-- applies one input row per target row). An instance's rows are appended only where its lease is proven
-- and renewed; the instance rows are locked in instance_id order, so two batches never wait on each other
-- in a cycle. Returns the leases that held.
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::double precision[], $4::double precision[],
                         $5::text[], $6::integer[])
        AS i(instance_id, lease_id, lock_expires_at, now, status, added)
), locked AS (
    SELECT g.instance_id FROM {schema}.geste_instances g JOIN input i USING (instance_id)
    WHERE g.lease_id = i.lease_id
    ORDER BY g.instance_id
    FOR UPDATE OF g
), lease AS (
    UPDATE {schema}.geste_instances g
    SET lock_expires_at = i.lock_expires_at, updated_at = i.now, steps = g.steps + i.added,
        status = COALESCE(i.status, g.status)
    FROM input i
    WHERE g.instance_id = i.instance_id AND g.lease_id = i.lease_id
      AND g.instance_id IN (SELECT instance_id FROM locked)
    RETURNING g.instance_id, i.lease_id, g.cancel_requested
), rows AS (
    INSERT INTO {schema}.geste_history (instance_id, seq, kind, name, payload, is_error, created_at)
    SELECT r.* FROM unnest($7::text[], $8::integer[], $9::text[], $10::text[], $11::text[],
                           $12::boolean[], $13::double precision[])
        AS r(instance_id, seq, kind, name, payload, is_error, created_at)
    WHERE r.instance_id IN (SELECT instance_id FROM lease)
)
SELECT instance_id, lease_id, cancel_requested FROM lease;

-- name: lock_event_keys
-- The advisory locks of a send or a wait (docs/design.md, "Events: matching by index"), in this order:
-- the event type's lock ($1; shared, or exclusive when $3), then the match keys $2, each shared, or
-- exclusive where $4 says so. A wait holds its one key exclusively, a send each of its keys shared: a send
-- and a wait that may accept its event meet on the wait's key; sends never wait for each other, nor waits
-- indexed under different keys. The type's lock is the one geste took for everything before schema 12:
-- held shared by every send and wait, it keeps them apart from those of a geste still running an older
-- version (exclusive), and a send of more than WIDE_EVENT_PAIRS pairs takes it exclusively instead of a
-- lock per pair. A function scan of one array: the locks are taken in the array's order.
SELECT CASE WHEN l.exclusive THEN pg_advisory_xact_lock(l.key) ELSE pg_advisory_xact_lock_shared(l.key) END
FROM unnest(hashtextextended('geste_event:' || $1, 0) || $2::bigint[], $3::boolean || $4::boolean[])
    AS l(key, exclusive);

-- name: suspend
-- One statement: mark waiting and release, append the rows, replace the timers and event wait.
-- Refused (no row updated) while a cancellation is pending. Returns (suspended, lease was ours).
-- The suspending worker becomes the instance's last_worker (the old locked_by: SET reads the old row):
-- its wake-ups and its timer go to it. The timer is announced (geste_timer_expired, for the workers that
-- watch it in case its keeper dies) only when it rings after the lease given up would have run out
-- (`lease`: the row as this statement's snapshot has it, before the UPDATE): the others learn of a
-- worker's death about a lease after its last heartbeat (two heartbeat periods and a slack), so a note
-- of an earlier timer would almost never be used, and every notifying commit makes every listening
-- backend of the database read the notification queue (docs/design.md, "Routing"). The run_at is the
-- earlier of the suspension's and the instance's deadline (schema 17; LEAST ignores a NULL): a waiting
-- instance becomes due when its deadline passes, and the claim that takes it then cancels it.
-- A child wait (schema 21; $14, the awaited child; NULL for any other wait): awaits = $14, which the claims
-- join, and the statement suspends only if the child has not ended, read by geste_child_now in a
-- snapshot taken after the instance's row is locked ("awaited"): a child's end that updated that row (its
-- wake-up of the parent) committed before the lock was granted and is seen there; one that has not
-- reached the row waits for this commit and then finds the parent waiting, and wakes it. An ended child
-- comes back in the a_* columns, with nothing written (the parent goes on under its lease): one round
-- trip instead of a transaction of four. The InitPlan of "awaited" runs before the UPDATE.
WITH lease AS (
    SELECT lock_expires_at FROM {schema}.geste_instances WHERE instance_id = $1 AND lease_id = $2
), awaited AS MATERIALIZED (
    SELECT c.* FROM (
        SELECT 1 FROM {schema}.geste_instances
        WHERE instance_id = $1 AND lease_id = $2 AND $14::text IS NOT NULL FOR UPDATE
    ) AS locked CROSS JOIN LATERAL {schema}.geste_child_now($14::text) AS c
), suspended AS (
    UPDATE {schema}.geste_instances
    SET status = 'waiting', run_at = LEAST($3, deadline), locked_by = NULL, lease_id = NULL,
        lock_expires_at = NULL, updated_at = $4, steps = steps + cardinality($5::integer[]),
        last_worker = locked_by, awaits = $14
    WHERE instance_id = $1 AND lease_id = $2 AND NOT cancel_requested
      AND NOT EXISTS (SELECT 1 FROM awaited WHERE status IN ('completed', 'failed', 'cancelled'))
    RETURNING instance_id, coalesce(runner, workflow_name) AS runner, last_worker
), rows AS (
    INSERT INTO {schema}.geste_history (instance_id, seq, kind, name, payload, is_error, created_at)
    SELECT $1, r.* FROM unnest($5::integer[], $6::text[], $7::text[], $8::text[], $9::boolean[],
                               $10::double precision[]) AS r
    WHERE EXISTS (SELECT 1 FROM suspended)
), old_timers AS (
    DELETE FROM {schema}.geste_timers
    WHERE instance_id = $1 AND seq IS DISTINCT FROM $11 AND EXISTS (SELECT 1 FROM suspended)
), old_wait AS (
    DELETE FROM {schema}.geste_event_waits WHERE instance_id = $1 AND EXISTS (SELECT 1 FROM suspended)
), timer AS (
    INSERT INTO {schema}.geste_timers (instance_id, seq, expires_at)
    SELECT $1, $11, $12 WHERE $11::integer IS NOT NULL AND EXISTS (SELECT 1 FROM suspended)
    ON CONFLICT (instance_id, seq) DO UPDATE SET expires_at = excluded.expires_at
), notified AS (  -- the suspender keeps a precise local wake-up at expires_at; the others watch a long one
    SELECT pg_notify('geste_timer_expired',
                     json_build_object('instance_id', $1::text, 'timer_id', $11::integer,
                                       'expires_at', $12::double precision, 'workflow_name', runner,
                                       'worker', last_worker, 'schema', {schema_name})::text)
    FROM suspended WHERE $13 AND $11::integer IS NOT NULL AND $12 > (SELECT lock_expires_at FROM lease)
)
SELECT EXISTS (SELECT 1 FROM suspended) AS suspended, EXISTS (SELECT 1 FROM lease) AS ours,
       (SELECT count(*) FROM notified) AS notified, a.workflow_name AS a_workflow, a.status AS a_status,
       a.result AS a_result, a.error AS a_error, a.parent_id AS a_parent
FROM (SELECT 1) AS one LEFT JOIN awaited AS a ON true;

-- name: continue_as_new
-- ctx.continue_as_new (schema 15), in one statement: the run ends and the next starts under the same id.
-- The instance's row is locked first ("old": a cancel flagged meanwhile is seen, and one flagged later
-- waits for this statement); with a cancel pending nothing is written (the engine delivers it at the
-- continue: the cancel wins). Otherwise the run's rows (those of geste_history and $5..$10, its last ones,
-- the continue_as_new row among them) move to geste_run_history, its summary goes to geste_runs, and the
-- instance gets the new input ($3), the next run number and an empty history, released and runnable now
-- (pending). Its timers and event wait go; its subscriptions stay, cursors and all, none waiting; its
-- event deliveries and event floor stay (the events it did not take are the next run's); its outbox
-- events not sent yet (pending or dead, through their partial indexes) go below the next run's steps
-- (step_seq minus $11, the run's last step), so the relay still sends them first. No notification: the
-- worker that continued keeps a local wake-up for the next run and claims it at once, like a timer due
-- before its lease would have run out (see `suspend`); another finds it by polling. Every part reads by
-- key: O(rows of the run). Returns (continued, lease was ours).
WITH old AS (
    SELECT instance_id, run, input, coalesce(run_started_at, created_at) AS started_at, cancel_requested
    FROM {schema}.geste_instances WHERE instance_id = $1 AND lease_id = $2
    FOR UPDATE
), ended AS (
    SELECT * FROM old WHERE NOT cancel_requested
), moved AS (
    DELETE FROM {schema}.geste_history
    WHERE instance_id = $1 AND EXISTS (SELECT 1 FROM ended)
    RETURNING seq, kind, name, payload, is_error, created_at
), archived AS (
    INSERT INTO {schema}.geste_run_history (instance_id, run, seq, kind, name, payload, is_error, created_at)
    SELECT $1, e.run, r.*
    FROM ended e, (SELECT * FROM moved
                   UNION ALL
                   SELECT * FROM unnest($5::integer[], $6::text[], $7::text[], $8::text[], $9::boolean[],
                                        $10::double precision[])) AS r
), summary AS (
    INSERT INTO {schema}.geste_runs (instance_id, run, input, started_at, ended_at, steps, ended_as)
    SELECT $1, run, input, started_at, $4, (SELECT count(*) FROM moved) + cardinality($5::integer[]),
           'continued'
    FROM ended
), reopened AS (
    UPDATE {schema}.geste_instances AS i
    SET run = i.run + 1, input = $3, run_started_at = $4, steps = 0, status = 'pending',
        run_at = LEAST($4, {db_clock}), locked_by = NULL, lease_id = NULL, lock_expires_at = NULL,
        updated_at = $4, last_worker = i.locked_by
    FROM ended e
    WHERE i.instance_id = e.instance_id
    RETURNING i.run
), timers AS (
    DELETE FROM {schema}.geste_timers WHERE instance_id = $1 AND EXISTS (SELECT 1 FROM ended)
), waits AS (
    DELETE FROM {schema}.geste_event_waits WHERE instance_id = $1 AND EXISTS (SELECT 1 FROM ended)
), listening AS (
    UPDATE {schema}.geste_channel_subscriptions SET waiting_since = NULL
    WHERE instance_id = $1 AND waiting_since IS NOT NULL AND EXISTS (SELECT 1 FROM ended)
), outbox AS (
    UPDATE {schema}.geste_outbox SET step_seq = step_seq - $11
    WHERE event_id IN (SELECT event_id FROM {schema}.geste_outbox WHERE instance_id = $1 AND status = 'pending'
                       UNION ALL
                       SELECT event_id FROM {schema}.geste_outbox WHERE instance_id = $1 AND status = 'dead')
      AND EXISTS (SELECT 1 FROM ended)
)
SELECT EXISTS (SELECT 1 FROM reopened) AS continued, EXISTS (SELECT 1 FROM old) AS ours;

-- name: list_runs
SELECT instance_id, run, input, started_at, ended_at, steps, ended_as
FROM {schema}.geste_runs WHERE instance_id = $1 ORDER BY run;

-- name: get_run_history
SELECT seq, kind, name, payload, is_error, created_at
FROM {schema}.geste_run_history WHERE instance_id = $1 AND run = $2 ORDER BY seq;

-- name: touch_lease
UPDATE {schema}.geste_instances
SET lock_expires_at = $3, updated_at = $4, steps = steps + $5
WHERE instance_id = $1 AND lease_id = $2
RETURNING cancel_requested;

-- name: finish
-- One statement: store the outcome and release, append the last rows, forget timers and waits, and the
-- instance's result() waiters (14): a probe of their primary key, which finds none unless someone waits.
-- The ending worker becomes the last worker (SET reads the old locked_by). A waiter of another process
-- than the ending worker's is told (one geste_workflow_resumable with "finished", whatever the number of
-- waiters); the ending worker's own process wakes its waiters in memory. No waiter: no NOTIFY.
-- $14 (16): the children whose cancellation the end requests (the parent-close policies), flagged in this
-- statement (`closed`); empty (the gate, a one-time filter): nothing more is probed. Then the instance and
-- those children are locked first, in instance_id order (`closing`), as renew, record_batch and
-- finish_batch lock their rows, so the end never deadlocks with its worker's renewal.
WITH closing AS MATERIALIZED (
    SELECT instance_id FROM {schema}.geste_instances
    WHERE cardinality($14::text[]) > 0 AND instance_id = ANY(array_prepend($1::text, $14::text[]))
    ORDER BY instance_id
    FOR UPDATE
), done AS (
    UPDATE {schema}.geste_instances
    SET status = $3, result = $4, error = $5, finished_at = $6, updated_at = $6,
        run_at = NULL, locked_by = NULL, lease_id = NULL, lock_expires_at = NULL, last_worker = locked_by,
        steps = steps + cardinality($7::integer[])
    WHERE instance_id = $1 AND lease_id = $2 AND (SELECT count(*) FROM closing) >= 0  -- (locked first)
    RETURNING instance_id, workflow_name, last_worker, parent_id
), closed AS (  -- (16) those children still running and not asked already, flagged as flag_cancel flags one
    -- (a free one made runnable and notified, a held one's holder told at once: 'cancel': true, routed to
    -- locked_by), parent_close 'cancelled' (the child's cancelled run reads it: cancelled_by_parent)
    UPDATE {schema}.geste_instances c
    SET cancel_requested = true, updated_at = $6, parent_close = 'cancelled',
        run_at = CASE WHEN c.lease_id IS NULL THEN LEAST(c.run_at, $6, {db_clock}) ELSE c.run_at END
    WHERE cardinality($14::text[]) > 0 AND c.instance_id = ANY($14::text[]) AND c.parent_id = $1
      AND c.status IN ('pending', 'running', 'waiting', 'compensating') AND NOT c.cancel_requested
      AND EXISTS (SELECT 1 FROM done)
    RETURNING c.instance_id, c.workflow_name, c.runner, c.lease_id, c.last_worker, c.locked_by
), closed_notified AS (
    SELECT pg_notify('geste_workflow_resumable',
                     CASE WHEN lease_id IS NULL
                          THEN json_build_object('instance_id', instance_id,
                                                 'workflow_name', coalesce(runner, workflow_name),
                                                 'worker', last_worker, 'schema', {schema_name})
                          ELSE json_build_object('instance_id', instance_id, 'workflow_name', workflow_name,
                                                 'worker', locked_by, 'cancel', true, 'schema', {schema_name})
                     END::text)
    FROM closed WHERE $13
), parent AS (  -- (16) a child's end makes its parent runnable if it waits: see wake_parent below
    UPDATE {schema}.geste_instances p
    SET run_at = CASE WHEN p.lease_id IS NULL AND p.status = 'waiting' THEN LEAST(p.run_at, $6, {db_clock})
                      ELSE p.run_at END
    FROM done WHERE p.instance_id = done.parent_id
    RETURNING p.instance_id, p.workflow_name, p.runner, p.last_worker,
              p.lease_id IS NULL AND p.status = 'waiting' AS woken
), parent_notified AS (
    SELECT pg_notify('geste_workflow_resumable',
                     json_build_object('instance_id', instance_id,
                                       'workflow_name', coalesce(runner, workflow_name),
                                       'worker', last_worker, 'schema', {schema_name})::text)
    FROM parent WHERE $13 AND woken
), awaited AS (
    DELETE FROM {schema}.geste_result_waiters WHERE instance_id = $1 AND EXISTS (SELECT 1 FROM done)
    RETURNING process
), notified AS (
    SELECT pg_notify('geste_workflow_resumable',
                     json_build_object('instance_id', instance_id, 'workflow_name', workflow_name,
                                       'finished', $3::text, 'schema', {schema_name})::text)
    FROM done
    WHERE $13 AND EXISTS (SELECT 1 FROM awaited WHERE process IS DISTINCT FROM done.last_worker)
), rows AS (
    INSERT INTO {schema}.geste_history (instance_id, seq, kind, name, payload, is_error, created_at)
    SELECT $1, r.* FROM unnest($7::integer[], $8::text[], $9::text[], $10::text[], $11::boolean[],
                               $12::double precision[]) AS r
    WHERE EXISTS (SELECT 1 FROM done)
), timers AS (
    DELETE FROM {schema}.geste_timers WHERE instance_id = $1 AND EXISTS (SELECT 1 FROM done)
), waits AS (
    DELETE FROM {schema}.geste_event_waits WHERE instance_id = $1 AND EXISTS (SELECT 1 FROM done)
)
SELECT count(*) AS done,
       (SELECT count(*) FROM notified) + (SELECT count(*) FROM parent_notified)
       + (SELECT count(*) FROM closed_notified) AS notified
FROM done;

-- name: finish_batch
-- Group commit of ends: several instances' outcomes in one statement, each under its own lease (locked
-- in instance_id order, as record_batch), each instance once (the storage sends another lease of an
-- instance in a batch alone). Returns the leases that held. Forgets and notifies the result() waiters of
-- each instance as `finish` does ($15: notifications on): one probe of their key per instance.
-- $16 (16): the children whose cancellation the ends request, flagged as in `finish` (`closed`), locked
-- with the batch's instances in instance_id order; empty: no probe (a one-time filter).
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                         $6::double precision[], $7::integer[])
        AS i(instance_id, lease_id, status, result, error, now, added)
), locked AS (
    SELECT g.instance_id FROM {schema}.geste_instances g
    WHERE g.instance_id = ANY($1::text[] || $16::text[])
    ORDER BY g.instance_id
    FOR UPDATE OF g
), done AS (
    UPDATE {schema}.geste_instances g
    SET status = i.status, result = i.result, error = i.error, finished_at = i.now, updated_at = i.now,
        run_at = NULL, locked_by = NULL, lease_id = NULL, lock_expires_at = NULL, steps = g.steps + i.added,
        last_worker = g.locked_by
    FROM input i
    WHERE g.instance_id = i.instance_id AND g.lease_id = i.lease_id
      AND g.instance_id IN (SELECT instance_id FROM locked)
    RETURNING g.instance_id, i.lease_id, g.workflow_name, i.status, g.last_worker, g.parent_id, i.now
), closed AS (  -- (16) as in finish; a child ending in this batch too is left to `done` (one update a row)
    UPDATE {schema}.geste_instances c
    SET cancel_requested = true, updated_at = d.now, parent_close = 'cancelled',
        run_at = CASE WHEN c.lease_id IS NULL THEN LEAST(c.run_at, d.now, {db_clock}) ELSE c.run_at END
    FROM done d
    WHERE cardinality($16::text[]) > 0 AND c.instance_id = ANY($16::text[]) AND c.parent_id = d.instance_id
      AND c.instance_id <> ALL($1::text[])
      AND c.status IN ('pending', 'running', 'waiting', 'compensating') AND NOT c.cancel_requested
    RETURNING c.instance_id, c.workflow_name, c.runner, c.lease_id, c.last_worker, c.locked_by
), closed_notified AS (
    SELECT pg_notify('geste_workflow_resumable',
                     CASE WHEN lease_id IS NULL
                          THEN json_build_object('instance_id', instance_id,
                                                 'workflow_name', coalesce(runner, workflow_name),
                                                 'worker', last_worker, 'schema', {schema_name})
                          ELSE json_build_object('instance_id', instance_id, 'workflow_name', workflow_name,
                                                 'worker', locked_by, 'cancel', true, 'schema', {schema_name})
                     END::text)
    FROM closed WHERE $15
), parent AS (  -- (16) as in finish: the waiting parents of the children that end are made runnable; a
    -- parent ending in this batch too is left to `done` (one statement must not update a row twice)
    UPDATE {schema}.geste_instances p
    SET run_at = CASE WHEN p.lease_id IS NULL AND p.status = 'waiting' THEN LEAST(p.run_at, d.now, {db_clock})
                      ELSE p.run_at END
    FROM done d WHERE p.instance_id = d.parent_id AND p.instance_id <> ALL($1::text[])
      AND p.instance_id NOT IN (SELECT instance_id FROM closed)  -- flagged there, which wakes it too
    RETURNING p.instance_id, p.workflow_name, p.runner, p.last_worker,
              p.lease_id IS NULL AND p.status = 'waiting' AS woken
), parent_notified AS (
    SELECT pg_notify('geste_workflow_resumable',
                     json_build_object('instance_id', instance_id,
                                       'workflow_name', coalesce(runner, workflow_name),
                                       'worker', last_worker, 'schema', {schema_name})::text)
    FROM parent WHERE $15 AND woken
), awaited AS (
    DELETE FROM {schema}.geste_result_waiters w USING done d WHERE w.instance_id = d.instance_id
    RETURNING w.instance_id, w.process
), notified AS (
    SELECT pg_notify('geste_workflow_resumable',
                     json_build_object('instance_id', d.instance_id, 'workflow_name', d.workflow_name,
                                       'finished', d.status, 'schema', {schema_name})::text)
    FROM done d
    WHERE $15 AND EXISTS (SELECT 1 FROM awaited a
                          WHERE a.instance_id = d.instance_id AND a.process IS DISTINCT FROM d.last_worker)
), rows AS (
    INSERT INTO {schema}.geste_history (instance_id, seq, kind, name, payload, is_error, created_at)
    SELECT r.* FROM unnest($8::text[], $9::integer[], $10::text[], $11::text[], $12::text[],
                           $13::boolean[], $14::double precision[])
        AS r(instance_id, seq, kind, name, payload, is_error, created_at)
    WHERE r.instance_id IN (SELECT instance_id FROM done)
), timers AS (
    DELETE FROM {schema}.geste_timers WHERE instance_id IN (SELECT instance_id FROM done)
), waits AS (
    DELETE FROM {schema}.geste_event_waits WHERE instance_id IN (SELECT instance_id FROM done)
)
SELECT instance_id, lease_id,
       (SELECT count(*) FROM notified) + (SELECT count(*) FROM parent_notified)
       + (SELECT count(*) FROM closed_notified) AS notified
FROM done;

-- name: insert_event_wait
-- The wait keeps the instance's event floor: send_event delivers only an event above it. since: when the
-- wait was registered (shown to operators). match_key ($7): the key it is found by; match_pairs ($8): the
-- canonical pairs an event must all have (12).
INSERT INTO {schema}.geste_event_waits
    (instance_id, event_type, match, since, deadline, outcome_seq, after_seq, match_key, match_pairs)
VALUES ($1, $2, $3, $4, $5, $6,
        (SELECT coalesce(event_floor, 0) FROM {schema}.geste_instances WHERE instance_id = $1), $7, $8)
ON CONFLICT (instance_id) DO UPDATE SET
    event_type = excluded.event_type, match = excluded.match, since = excluded.since,
    deadline = excluded.deadline, outcome_seq = excluded.outcome_seq, after_seq = excluded.after_seq,
    match_key = excluded.match_key, match_pairs = excluded.match_pairs;

-- name: candidate_events
-- For a wait without a match: the first event of the type above the instance's event floor
-- (geste_events_by_type: (event_type, seq)) not yet delivered to it. Each candidate's delivery is one
-- probe of the deliveries' key: OFFSET 0 keeps the NOT EXISTS a subquery per candidate (as an anti join
-- the planner read the whole of geste_event_deliveries_by_event, filtering on the instance: 100,000
-- entries of other instances' deliveries before the first event, measured).
SELECT e.seq, e.event_id, e.event_type, e.data, e.source, e.extensions, e.created_at
FROM {schema}.geste_events e
WHERE e.event_type = $1
  AND e.seq > (SELECT coalesce(event_floor, 0) FROM {schema}.geste_instances WHERE instance_id = $2)
  AND (e.target_instance_id IS NULL OR e.target_instance_id = $2)
  AND NOT EXISTS (SELECT 1 FROM {schema}.geste_event_deliveries d
                  WHERE d.instance_id = $2 AND d.event_seq = e.seq OFFSET 0)
ORDER BY e.seq
LIMIT 1;

-- name: candidate_events_by_key
-- For a wait with a match: the events above the instance's event floor that have the pair the wait is
-- indexed by ($3, its match key: geste_event_keys' (match_key, event_seq) range), not yet delivered to
-- it, oldest first; and those stored without keys (before schema 12, or by an older geste: the partial
-- index geste_events_unkeyed, empty once they are gone). The caller compares the whole match.
SELECT e.seq, e.event_id, e.event_type, e.data, e.source, e.extensions, e.created_at
FROM {schema}.geste_event_keys k JOIN {schema}.geste_events e ON e.seq = k.event_seq
WHERE k.match_key = $3
  AND k.event_seq > (SELECT coalesce(event_floor, 0) FROM {schema}.geste_instances WHERE instance_id = $2)
  AND e.event_type = $1
  AND (e.target_instance_id IS NULL OR e.target_instance_id = $2)
  AND NOT EXISTS (SELECT 1 FROM {schema}.geste_event_deliveries d
                  WHERE d.instance_id = $2 AND d.event_seq = e.seq OFFSET 0)
UNION ALL
SELECT e.seq, e.event_id, e.event_type, e.data, e.source, e.extensions, e.created_at
FROM {schema}.geste_events e
WHERE NOT e.keyed AND e.event_type = $1
  AND e.seq > (SELECT coalesce(event_floor, 0) FROM {schema}.geste_instances WHERE instance_id = $2)
  AND (e.target_instance_id IS NULL OR e.target_instance_id = $2)
  AND NOT EXISTS (SELECT 1 FROM {schema}.geste_event_deliveries d
                  WHERE d.instance_id = $2 AND d.event_seq = e.seq OFFSET 0)
ORDER BY seq;

-- name: unkeyed_waits
-- Migration 12's part in Python: the waits registered before it (geste_event_waits_unkeyed).
SELECT instance_id, event_type, match FROM {schema}.geste_event_waits WHERE match_key IS NULL;

-- name: key_wait
UPDATE {schema}.geste_event_waits SET match_key = $2, match_pairs = $3
WHERE instance_id = $1 AND match_key IS NULL;

-- name: insert_delivery
INSERT INTO {schema}.geste_event_deliveries (instance_id, event_seq) VALUES ($1, $2);

-- name: send_event
-- An event stored and handed over in one statement, run after lock_event_keys in the same transaction:
-- its snapshot, taken once the locks are granted, holds every wait that may accept the event and was
-- registered before (docs/design.md, "Events: matching by index"). $1-$7: the event's columns (id, type,
-- source, data, extensions, target instance, time); $8: its pairs' match keys (its geste_event_keys rows);
-- $9: the keys of the waits that may accept it (the type's, for the waits without a match, and its
-- pairs'); $10: its pairs' canonical texts; $11: its history payload; $12: notify.
-- found: the waits it may wake, by key (geste_event_waits_by_key), whose every pair it has, and whose
-- instance's floor is below its seq; or the target's wait alone; or a wait of an older geste (no keys,
-- by type through geste_event_waits_unkeyed), woken to look for itself. locked: their instances, locked
-- in instance_id order (concurrent sends never deadlock), read again as they are now: the event is
-- handed (written into the history at the wait's outcome seq) only to an instance still waiting, held by
-- nobody, and with the history it had when the wait was found (steps unchanged: no other send handed it
-- an event meanwhile); the others that wait or run, held by nobody, are made runnable now and take it
-- themselves. A held instance is left as it is: it takes the event itself in take_event_or_suspend, and
-- its run_at is its take-over time (schema 11).
WITH event AS (
    INSERT INTO {schema}.geste_events
        (event_id, event_type, source, data, extensions, target_instance_id, created_at, keyed)
    VALUES ($1, $2, $3, $4, $5, $6, $7, true)
    ON CONFLICT (event_id) DO NOTHING
    RETURNING seq
), keys AS (
    INSERT INTO {schema}.geste_event_keys (match_key, event_seq)
    SELECT k, event.seq FROM event, unnest($8::bigint[]) AS k
), found AS (
    SELECT w.instance_id, w.outcome_seq, true AS exact, i.steps
    FROM event, {schema}.geste_event_waits w JOIN {schema}.geste_instances i ON i.instance_id = w.instance_id
    WHERE $6::text IS NULL AND w.match_key = ANY($9::bigint[]) AND w.event_type = $2
      AND w.match_pairs <@ $10::text[] AND coalesce(w.after_seq, 0) < event.seq
    UNION ALL
    SELECT w.instance_id, w.outcome_seq, false, i.steps
    FROM event, {schema}.geste_event_waits w JOIN {schema}.geste_instances i ON i.instance_id = w.instance_id
    WHERE $6::text IS NULL AND w.match_key IS NULL AND w.event_type = $2
      AND coalesce(w.after_seq, 0) < event.seq
    UNION ALL
    SELECT w.instance_id, w.outcome_seq, w.match_pairs IS NOT NULL, i.steps
    FROM event, {schema}.geste_event_waits w JOIN {schema}.geste_instances i ON i.instance_id = w.instance_id
    WHERE w.instance_id = $6::text AND w.event_type = $2 AND coalesce(w.after_seq, 0) < event.seq
      AND (w.match_pairs IS NULL OR w.match_pairs <@ $10::text[])
), locked AS (
    SELECT i.instance_id, f.outcome_seq,
           f.exact AND f.outcome_seq IS NOT NULL AND i.status = 'waiting' AND i.lease_id IS NULL
               AND i.steps = f.steps AS handed
    FROM {schema}.geste_instances i JOIN found f ON f.instance_id = i.instance_id
    ORDER BY i.instance_id
    FOR UPDATE OF i
), touched AS (
    UPDATE {schema}.geste_instances i
    SET run_at = LEAST($7, {db_clock}), updated_at = $7,
        steps = i.steps + CASE WHEN l.handed THEN 1 ELSE 0 END
    FROM locked l
    WHERE i.instance_id = ANY(ARRAY(SELECT instance_id FROM locked)) AND i.instance_id = l.instance_id
      AND i.status IN ('waiting', 'running') AND i.lease_id IS NULL
      AND (l.handed OR i.run_at IS NULL OR i.run_at > LEAST($7, {db_clock}))
    RETURNING i.instance_id, i.workflow_name, i.runner, i.lease_id, i.last_worker, l.outcome_seq, l.handed
), rows AS (
    INSERT INTO {schema}.geste_history (instance_id, seq, kind, name, payload, is_error, created_at)
    SELECT instance_id, outcome_seq, 'event', $2, $11, false, $7 FROM touched WHERE handed
), deliveries AS (
    INSERT INTO {schema}.geste_event_deliveries (instance_id, event_seq)
    SELECT t.instance_id, event.seq FROM touched t, event WHERE t.handed
), waits AS (
    DELETE FROM {schema}.geste_event_waits w USING touched t WHERE w.instance_id = t.instance_id AND t.handed
), timers AS (
    DELETE FROM {schema}.geste_timers tm USING touched t WHERE tm.instance_id = t.instance_id AND t.handed
), notified AS (
    SELECT pg_notify('geste_workflow_resumable',
                     json_build_object('instance_id', instance_id,
                                       'workflow_name', coalesce(runner, workflow_name),
                                       'worker', last_worker, 'schema', {schema_name})::text)
    FROM touched WHERE $12 AND lease_id IS NULL
)
SELECT EXISTS (SELECT 1 FROM event) AS stored,
       ARRAY(SELECT instance_id FROM touched) AS woken,
       (SELECT count(*) FROM notified) AS notified;

-- name: next_run_at
-- One probe of geste_instances_runnable_by_name (free instances only, schema 11) per distinct workflow
-- name with a free instance that has a run_at (a loose scan of the same index).
WITH RECURSIVE names(name) AS (
    SELECT min(coalesce(runner, workflow_name)) FROM {schema}.geste_instances
    WHERE run_at IS NOT NULL AND lease_id IS NULL
      AND status IN ('pending', 'running', 'waiting', 'compensating')
    UNION ALL
    SELECT (SELECT min(coalesce(i.runner, i.workflow_name)) FROM {schema}.geste_instances i
            WHERE i.run_at IS NOT NULL AND i.lease_id IS NULL AND coalesce(i.runner, i.workflow_name) > n.name
              AND i.status IN ('pending', 'running', 'waiting', 'compensating'))
    FROM names n WHERE n.name IS NOT NULL
)
SELECT min((SELECT i.run_at FROM {schema}.geste_instances i
            WHERE coalesce(i.runner, i.workflow_name) = ANY(ARRAY[n.name]) AND i.run_at IS NOT NULL AND i.lease_id IS NULL
              AND i.status IN ('pending', 'running', 'waiting', 'compensating')
            ORDER BY coalesce(i.runner, i.workflow_name), i.run_at LIMIT 1)) AS run_at
FROM names n WHERE n.name IS NOT NULL;

-- name: upsert_worker
-- Registration and every heartbeat: one statement (a HOT update: no index covers what it changes). A
-- worker id seen again (a restart) starts afresh.
INSERT INTO {schema}.geste_workers
    (worker_id, host, pid, started_at, heartbeat_at, running, concurrency, listener, stopped_at, lock_timeout,
     workflows, health, relay, version, queues)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, NULL, $9, $10, $11, $12, $13, $14)
ON CONFLICT (worker_id) DO UPDATE SET
    host = excluded.host, pid = excluded.pid, started_at = excluded.started_at,
    heartbeat_at = excluded.heartbeat_at, running = excluded.running, concurrency = excluded.concurrency,
    listener = excluded.listener, stopped_at = NULL, lock_timeout = excluded.lock_timeout,
    workflows = excluded.workflows, health = excluded.health, relay = excluded.relay,
    version = excluded.version, queues = excluded.queues;

-- name: heartbeat
-- upsert_worker ($15: its queues), and in the same statement the other workers heard from since $14 and not
-- stopped: what
-- the worker routes wake-ups over (schema 13; the routing view, docs/design.md "Wake-ups"). The SELECT
-- reads the snapshot from before the upsert, which it does not need (it leaves this worker out). A
-- sequential scan of a table as small as the fleet (pruned of the workers silent for a week).
WITH beat AS (
    INSERT INTO {schema}.geste_workers
        (worker_id, host, pid, started_at, heartbeat_at, running, concurrency, listener, stopped_at,
         lock_timeout, workflows, health, relay, version, queues)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, NULL, $9, $10, $11, $12, $13, $15)
    ON CONFLICT (worker_id) DO UPDATE SET
        host = excluded.host, pid = excluded.pid, started_at = excluded.started_at,
        heartbeat_at = excluded.heartbeat_at, running = excluded.running, concurrency = excluded.concurrency,
        listener = excluded.listener, stopped_at = NULL, lock_timeout = excluded.lock_timeout,
        workflows = excluded.workflows, health = excluded.health, relay = excluded.relay,
        version = excluded.version, queues = excluded.queues
)
SELECT worker_id, host, pid, started_at, heartbeat_at, running, concurrency, listener, stopped_at,
       lock_timeout, workflows, health, relay, version, queues
FROM {schema}.geste_workers
WHERE worker_id <> $1 AND stopped_at IS NULL AND heartbeat_at >= $14
ORDER BY worker_id LIMIT 1000;

-- name: mark_worker_stopped
UPDATE {schema}.geste_workers SET stopped_at = $2, running = 0 WHERE worker_id = $1;

-- name: prune_workers
DELETE FROM {schema}.geste_workers WHERE heartbeat_at < $1;

-- name: list_workers
-- The table holds the workers heard from within a week (pruned at each start): a small scan.
SELECT worker_id, host, pid, started_at, heartbeat_at, running, concurrency, listener, stopped_at,
       lock_timeout, workflows, health, relay, version, queues
FROM {schema}.geste_workers ORDER BY heartbeat_at DESC, worker_id LIMIT $1;

-- name: count_by_status
-- An index-only scan of geste_instances_by_status (status, created_at) where the visibility map allows.
SELECT status, count(*) AS n FROM {schema}.geste_instances GROUP BY status;

-- name: count_runnable
-- What claims at $1 could take (a status this version runs); per distinct workflow name with a free
-- instance that has a run_at or a held one, the two ranges a claim reads (schema 11): the free
-- instances due by $1 and the leases that ran out by $1. It reads the runnable instances, never the
-- finished ones, nor those waiting for later, nor the leases still held.
WITH RECURSIVE names(name) AS (  -- a loose scan of both indexes: one probe of each per distinct name
    SELECT LEAST((SELECT min(coalesce(runner, workflow_name)) FROM {schema}.geste_instances
                  WHERE run_at IS NOT NULL AND lease_id IS NULL
                    AND status IN ('pending', 'running', 'waiting', 'compensating')),
                 (SELECT min(coalesce(runner, workflow_name)) FROM {schema}.geste_instances
                  WHERE lease_id IS NOT NULL AND status IN ('pending', 'running', 'waiting', 'compensating')))
    UNION ALL
    SELECT LEAST((SELECT min(coalesce(i.runner, i.workflow_name)) FROM {schema}.geste_instances i
                  WHERE i.run_at IS NOT NULL AND i.lease_id IS NULL AND coalesce(i.runner, i.workflow_name) > n.name
                    AND i.status IN ('pending', 'running', 'waiting', 'compensating')),
                 (SELECT min(coalesce(i.runner, i.workflow_name)) FROM {schema}.geste_instances i
                  WHERE i.lease_id IS NOT NULL AND coalesce(i.runner, i.workflow_name) > n.name
                    AND i.status IN ('pending', 'running', 'waiting', 'compensating')))
    FROM names n WHERE n.name IS NOT NULL
)
SELECT coalesce(sum((SELECT count(*) FROM {schema}.geste_instances i
                     WHERE coalesce(i.runner, i.workflow_name) = ANY(ARRAY[n.name]) AND i.lease_id IS NULL AND i.run_at <= $1
                       AND i.status IN ('pending', 'running', 'waiting', 'compensating'))
                    + (SELECT count(*) FROM {schema}.geste_instances i
                       WHERE coalesce(i.runner, i.workflow_name) = ANY(ARRAY[n.name]) AND i.lease_id IS NOT NULL
                         AND i.run_at <= $1 AND i.lock_expires_at <= $1
                         AND i.status IN ('pending', 'running', 'waiting', 'compensating'))), 0)::bigint AS n
FROM names n WHERE n.name IS NOT NULL;

-- name: held_leases
-- A lease is only ever held by a running or compensating instance (claims and local starts make it
-- running; suspending and finishing release it), so geste_instances_by_status bounds the read.
SELECT locked_by, count(*) AS n FROM {schema}.geste_instances
WHERE status IN ('running', 'compensating') AND lease_id IS NOT NULL AND lock_expires_at > $1
GROUP BY locked_by;

-- name: list_leases
-- The held leases themselves, soonest to expire first (bounded like held_leases, then sorted).
SELECT instance_id, workflow_name, locked_by, lock_expires_at FROM {schema}.geste_instances
WHERE status IN ('running', 'compensating') AND lease_id IS NOT NULL AND lock_expires_at > $1
ORDER BY lock_expires_at, instance_id LIMIT $2;

-- name: oldest_waiting
-- Through geste_instances_by_status: reads the waiting instances only (updated_at has no index of its
-- own, which every step commit would have to maintain).
SELECT min(updated_at) AS oldest FROM {schema}.geste_instances WHERE status = 'waiting';

-- name: outbox_stats
-- For queue_stats: the pending and the dead outbox events, counted in their partial indexes (the cost
-- grows with those events, not with the delivered ones), and the creation time of the oldest pending one
-- (the first entry of geste_outbox_pending_by_created).
SELECT (SELECT count(*) FROM {schema}.geste_outbox WHERE status = 'pending') AS pending,
       (SELECT count(*) FROM {schema}.geste_outbox WHERE status = 'dead') AS dead,
       (SELECT created_at FROM {schema}.geste_outbox WHERE status = 'pending' ORDER BY created_at LIMIT 1)
           AS oldest_pending;

-- name: outbox_record
-- ctx.send_event in one statement: the step commit of `record` (prove and renew the lease, append the
-- rows) plus the outbox row, and a geste_outbox_pending NOTIFY ($18) for the relays of other processes.
-- An event id already in the outbox is not stored again (nor notified). "worker": the recording worker,
-- whose own relay was told already (the others leave the event to it if it runs one).
WITH lease AS (
    UPDATE {schema}.geste_instances
    SET lock_expires_at = $3, updated_at = $4, steps = steps + cardinality($5::integer[]),
        status = COALESCE($11, status)
    WHERE instance_id = $1 AND lease_id = $2
    RETURNING cancel_requested, locked_by
), rows AS (
    INSERT INTO {schema}.geste_history (instance_id, seq, kind, name, payload, is_error, created_at)
    SELECT $1, r.* FROM unnest($5::integer[], $6::text[], $7::text[], $8::text[], $9::boolean[],
                               $10::double precision[]) AS r
    WHERE EXISTS (SELECT 1 FROM lease)
), event AS (
    INSERT INTO {schema}.geste_outbox
        (event_id, instance_id, step_seq, event_type, source, subject, data, status, attempts,
         next_attempt_at, created_at, updated_at)
    SELECT $12, $1, $13, $14, $15, $16, $17, 'pending', 0, $4, $4, $4
    WHERE EXISTS (SELECT 1 FROM lease)
    ON CONFLICT (event_id) DO NOTHING
    RETURNING event_id
), notified AS (
    SELECT pg_notify('geste_outbox_pending',
                     json_build_object('event_id', event_id, 'worker', (SELECT locked_by FROM lease),
                                       'schema', {schema_name})::text)
    FROM event WHERE $18
)
SELECT cancel_requested, (SELECT count(*) FROM event) AS stored, (SELECT count(*) FROM notified) AS notified
FROM lease;

-- name: outbox_claim
-- One round of a relay, reading at most $6 due rows (the window, soonest first) and, for each, the event
-- of its instance just before it that is not done (the nearer of the last earlier pending one and the
-- last earlier dead one: two probes of the partial indexes by instance). A row with none is the first of
-- its instance: claimed, at most $5 (FOR UPDATE SKIP LOCKED: relays take disjoint sets), each claim
-- counting as an attempt. A row with one leaves the due range, so that no round reads it again: held
-- (next_attempt_at NULL) behind an event nobody sends (dead, or pending and unclaimed), which is locked
-- FOR SHARE and read again, so that it cannot be claimed nor discarded before this commits (whoever ends
-- it later sees the held row, and makes it due: outbox_mark_delivered, outbox_promote); behind an event
-- being sent, moved to the end of a claim ($4) instead, as that sender may mark it from a snapshot
-- older than the row (it makes it due if it sees it; otherwise the row is looked at again then).
WITH win AS MATERIALIZED (
    SELECT o.event_id, o.instance_id, o.step_seq
    FROM {schema}.geste_outbox o
    WHERE o.status = 'pending' AND o.next_attempt_at <= $3
    ORDER BY o.next_attempt_at
    LIMIT $6
), seen AS MATERIALIZED (
    SELECT w.event_id,
           (SELECT b.event_id
            FROM ((SELECT e.event_id, e.step_seq FROM {schema}.geste_outbox e
                   WHERE e.status = 'pending' AND e.instance_id = w.instance_id AND e.step_seq < w.step_seq
                   ORDER BY e.step_seq DESC LIMIT 1)
                  UNION ALL
                  (SELECT e.event_id, e.step_seq FROM {schema}.geste_outbox e
                   WHERE e.status = 'dead' AND e.instance_id = w.instance_id AND e.step_seq < w.step_seq
                   ORDER BY e.step_seq DESC LIMIT 1)) b
            ORDER BY b.step_seq DESC
            LIMIT 1) AS before_id
    FROM win w
), picked AS (
    SELECT o.event_id
    FROM {schema}.geste_outbox o
    WHERE o.event_id = ANY (ARRAY(SELECT event_id FROM seen WHERE before_id IS NULL))  -- by primary key
      AND o.status = 'pending' AND o.next_attempt_at <= $3
      AND (o.claim_id IS NULL OR o.claim_expires_at <= $3)
    ORDER BY o.next_attempt_at
    LIMIT $5
    FOR UPDATE OF o SKIP LOCKED
), behind AS (
    SELECT o.event_id, b.claim_id IS NULL AS idle
    FROM {schema}.geste_outbox o
    JOIN seen s ON s.event_id = o.event_id
    JOIN {schema}.geste_outbox b ON b.event_id = s.before_id
    WHERE o.event_id = ANY (ARRAY(SELECT event_id FROM seen WHERE before_id IS NOT NULL))
      AND o.status = 'pending' AND o.next_attempt_at <= $3 AND b.status IN ('pending', 'dead')
    FOR UPDATE OF o SKIP LOCKED
    FOR SHARE OF b SKIP LOCKED
), moved AS (
    UPDATE {schema}.geste_outbox o
    SET next_attempt_at = CASE WHEN behind.idle THEN NULL ELSE $4::double precision END
    FROM behind
    WHERE o.event_id = behind.event_id
)
UPDATE {schema}.geste_outbox AS o
SET claimed_by = $1, claim_id = $2, claim_expires_at = $4, attempts = o.attempts + 1, updated_at = $3
FROM picked
WHERE o.event_id = picked.event_id
RETURNING o.event_id, o.instance_id, o.step_seq, o.event_type, o.source, o.subject, o.data, o.attempts,
          o.created_at;

-- name: outbox_mark_delivered
-- Returns (the claim was ours, the instance has a later pending event: the relay looks again at once).
-- That next event is made due now if it was held (or moved to a claim's end) behind this one: always
-- written, so that a claim round holding it at this moment is waited for and its value read again.
WITH marked AS (
    UPDATE {schema}.geste_outbox
    SET status = 'delivered', delivered_at = $3, updated_at = $3, next_attempt_at = NULL,
        claimed_by = NULL, claim_id = NULL, claim_expires_at = NULL
    WHERE event_id = $1 AND claim_id = $2 AND status = 'pending'
    RETURNING instance_id, step_seq
), next_one AS (
    SELECT e.event_id
    FROM {schema}.geste_outbox e JOIN marked m ON e.instance_id = m.instance_id
    WHERE e.status = 'pending' AND e.step_seq > m.step_seq
    ORDER BY e.step_seq
    LIMIT 1
), promoted AS (
    UPDATE {schema}.geste_outbox o
    SET next_attempt_at = CASE WHEN o.next_attempt_at IS NULL OR o.next_attempt_at > $3 THEN $3
                               ELSE o.next_attempt_at END
    FROM next_one n
    WHERE o.event_id = n.event_id AND o.status = 'pending'
)
SELECT EXISTS (SELECT 1 FROM marked) AS ours, EXISTS (SELECT 1 FROM next_one) AS later;

-- name: outbox_mark_failed
-- A NULL next attempt ($5) means no attempt is left: the event is dead (kept, with its last error).
-- The next pending event of the instance is held behind it (next_attempt_at NULL), if it was not: a claim
-- round had moved it to the end of the claim, the event being sent then.
-- Returns (the claim was ours, the instance has a later pending event).
WITH marked AS (
    UPDATE {schema}.geste_outbox
    SET status = CASE WHEN $5::double precision IS NULL THEN 'dead' ELSE 'pending' END,
        next_attempt_at = $5, last_error = $4, updated_at = $3,
        claimed_by = NULL, claim_id = NULL, claim_expires_at = NULL
    WHERE event_id = $1 AND claim_id = $2 AND status = 'pending'
    RETURNING instance_id, step_seq
), next_one AS (
    SELECT e.event_id
    FROM {schema}.geste_outbox e JOIN marked m ON e.instance_id = m.instance_id
    WHERE e.status = 'pending' AND e.step_seq > m.step_seq
    ORDER BY e.step_seq
    LIMIT 1
), held AS (
    UPDATE {schema}.geste_outbox o
    SET next_attempt_at = NULL
    FROM next_one n
    WHERE o.event_id = n.event_id AND o.status = 'pending' AND o.next_attempt_at IS NOT NULL
)
SELECT EXISTS (SELECT 1 FROM marked) AS ours, EXISTS (SELECT 1 FROM next_one) AS later;

-- name: outbox_release
-- A relay stopping gives back the claims it could not finish: claimable again at once.
UPDATE {schema}.geste_outbox SET claimed_by = NULL, claim_id = NULL, claim_expires_at = NULL, updated_at = $3
WHERE event_id = $1 AND claim_id = $2 AND status = 'pending';

-- name: outbox_next_attempt_at
-- When the relay should look again: the earliest next_attempt_at of an event nobody sends (read in
-- next_attempt_at order until one is found: past the events being sent only), or the expiry of a claim
-- before it, if sooner (a relay that died: its events are taken over then). Held events (NULL) are not
-- read; an event that waits behind another but is not held yet counts (a claim round holds it).
WITH first AS MATERIALIZED (
    SELECT o.next_attempt_at AS at
    FROM {schema}.geste_outbox o
    WHERE o.status = 'pending' AND o.next_attempt_at IS NOT NULL
      AND (o.claim_id IS NULL OR o.claim_expires_at <= o.next_attempt_at)
    ORDER BY o.next_attempt_at
    LIMIT 1
)
SELECT LEAST((SELECT at FROM first),
             (SELECT min(c.claim_expires_at) FROM {schema}.geste_outbox c
              WHERE c.status = 'pending' AND c.claim_id IS NOT NULL AND c.claim_expires_at > c.next_attempt_at
                AND c.next_attempt_at <= COALESCE((SELECT at FROM first), 'infinity'))) AS at;

-- name: outbox_list
SELECT event_id, instance_id, step_seq, event_type, source, subject, data, status, attempts,
       next_attempt_at, last_error, created_at, updated_at, delivered_at, claimed_by
FROM {schema}.geste_outbox
WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR instance_id = $2)
ORDER BY created_at DESC, instance_id, step_seq DESC
LIMIT $3;

-- name: outbox_retry
-- An operator re-queues a dead event: pending again, attempts from zero (its last error is kept), and
-- the relays of other processes are told ($3).
WITH requeued AS (
    UPDATE {schema}.geste_outbox
    SET status = 'pending', attempts = 0, next_attempt_at = $2, updated_at = $2
    WHERE event_id = $1 AND status = 'dead'
    RETURNING event_id
)
SELECT count(*) AS found,
       count(CASE WHEN $3 THEN pg_notify('geste_outbox_pending',
                                         json_build_object('event_id', event_id, 'worker', NULL,
                                                           'schema', {schema_name})::text)
             END) AS notified
FROM requeued;

-- name: outbox_discard
-- An operator gives an event up (pending or dead): never sent again. In a transaction with outbox_promote.
UPDATE {schema}.geste_outbox
SET status = 'discarded', next_attempt_at = NULL, claimed_by = NULL, claim_id = NULL,
    claim_expires_at = NULL, updated_at = $2
WHERE event_id = $1 AND status IN ('pending', 'dead')
RETURNING instance_id, step_seq;

-- name: outbox_promote
-- After outbox_discard, in its transaction but a statement of its own: its snapshot, taken once the
-- discard had its row (a claim round holding the row FOR SHARE was waited for), sees every event held
-- behind it. The instance's next pending event (instance $1, after seq $2) is made due now if it was
-- held; the relays of other processes are told ($4) that it may be claimable.
WITH next_one AS (
    SELECT e.event_id FROM {schema}.geste_outbox e
    WHERE e.status = 'pending' AND e.instance_id = $1 AND e.step_seq > $2
    ORDER BY e.step_seq
    LIMIT 1
), promoted AS (
    UPDATE {schema}.geste_outbox o
    SET next_attempt_at = $3
    FROM next_one n
    WHERE o.event_id = n.event_id AND o.status = 'pending'
      AND (o.next_attempt_at IS NULL OR o.next_attempt_at > $3)
)
SELECT count(*) AS promoted,
       count(CASE WHEN $4 THEN pg_notify('geste_outbox_pending',
                                         json_build_object('event_id', event_id, 'worker', NULL,
                                                           'schema', {schema_name})::text)
             END) AS notified
FROM next_one;

-- Channels (ctx.subscribe / receive / publish / send_to). A publish and a receive on one channel take
-- the channel's advisory lock first (channel_lock, its own statement, so that what they read next
-- includes everything committed before they got it): no lost wake-up, and on a channel the messages
-- commit in the order of their seq, which is what the subscribers' cursors rely on.

-- name: channel_lock
SELECT pg_advisory_xact_lock(hashtextextended('geste_channel:' || $1, 0));

-- name: channel_subscribe
-- An explicit ctx.subscribe, in one statement: renew the lease, append the rows, subscribe from the
-- channel's last message on. A subscription there already in the same mode is kept as it is, cursor and
-- all (schema 15: one an earlier run of the instance made, which continue_as_new carries over, so the
-- messages it has not taken yet are the new run's); one in the other mode (left by an attempt whose step
-- was not recorded) is replaced.
WITH lease AS (
    UPDATE {schema}.geste_instances
    SET lock_expires_at = $3, updated_at = $4, steps = steps + cardinality($5::integer[])
    WHERE instance_id = $1 AND lease_id = $2
    RETURNING cancel_requested
), rows AS (
    INSERT INTO {schema}.geste_history (instance_id, seq, kind, name, payload, is_error, created_at)
    SELECT $1, r.* FROM unnest($5::integer[], $6::text[], $7::text[], $8::text[], $9::boolean[],
                               $10::double precision[]) AS r
    WHERE EXISTS (SELECT 1 FROM lease)
), sub AS (
    INSERT INTO {schema}.geste_channel_subscriptions
        (channel, instance_id, mode, cursor_seq, waiting_since, created_at)
    SELECT $11, $1, $12,
           (SELECT COALESCE(max(seq), 0) FROM {schema}.geste_channel_messages WHERE channel = $11), NULL, $4
    WHERE EXISTS (SELECT 1 FROM lease)
    ON CONFLICT (channel, instance_id) DO UPDATE SET
        cursor_seq = CASE WHEN geste_channel_subscriptions.mode = excluded.mode
                          THEN geste_channel_subscriptions.cursor_seq ELSE excluded.cursor_seq END,
        created_at = CASE WHEN geste_channel_subscriptions.mode = excluded.mode
                          THEN geste_channel_subscriptions.created_at ELSE excluded.created_at END,
        mode = excluded.mode, waiting_since = NULL
)
SELECT cancel_requested FROM lease;

-- name: channel_find
-- receive(): prove the lease ($5; read, not locked: the take or the suspension that follows in this
-- transaction proves it again as it writes), ensure the subscription (a first receive subscribes, from
-- the channel's last message on), then the instance's next message, oldest first: one after its cursor
-- (broadcast: every one; competing: one nobody took), or a direct one not yet taken. Returns (lease
-- was ours, mode, message columns or NULLs): a worker whose lease was taken over subscribes nothing.
WITH lease AS (
    SELECT instance_id FROM {schema}.geste_instances WHERE instance_id = $2 AND lease_id = $5
), new_sub AS (
    INSERT INTO {schema}.geste_channel_subscriptions
        (channel, instance_id, mode, cursor_seq, waiting_since, created_at)
    SELECT $1, $2, $3,
           (SELECT COALESCE(max(seq), 0) FROM {schema}.geste_channel_messages WHERE channel = $1), NULL, $4
    WHERE EXISTS (SELECT 1 FROM lease)
    ON CONFLICT (channel, instance_id) DO NOTHING
    RETURNING mode, cursor_seq
), sub AS (
    SELECT mode, cursor_seq FROM new_sub
    UNION ALL
    SELECT mode, cursor_seq FROM {schema}.geste_channel_subscriptions WHERE channel = $1 AND instance_id = $2
    LIMIT 1
)
SELECT EXISTS (SELECT 1 FROM lease) AS ours, sub.mode, m.seq, m.message_id, m.channel, m.data,
       m.sender_instance_id, m.target_instance_id, m.created_at
FROM (SELECT 1) AS one LEFT JOIN sub ON true LEFT JOIN LATERAL (
    SELECT * FROM (
        (SELECT seq, message_id, channel, data, sender_instance_id, target_instance_id, created_at
         FROM {schema}.geste_channel_messages
         WHERE channel = $1 AND seq > sub.cursor_seq AND target_instance_id IS NULL
           AND (sub.mode = 'broadcast' OR claimed_by IS NULL)
         ORDER BY seq LIMIT 1)
        UNION ALL
        (SELECT seq, message_id, channel, data, sender_instance_id, target_instance_id, created_at
         FROM {schema}.geste_channel_messages
         WHERE target_instance_id = $2 AND channel = $1 AND claimed_by IS NULL
         ORDER BY seq LIMIT 1)
    ) AS c ORDER BY seq LIMIT 1
) AS m ON true;

-- name: channel_take
-- A message taken, in one statement: renew the lease, claim the message (direct or competing: only if
-- nobody did), move the cursor past it and end the wait, append the rows with the message's.
-- Returns (cancel_requested, taken); nothing is written unless both the lease and the claim hold.
WITH lease AS (
    UPDATE {schema}.geste_instances
    SET lock_expires_at = $3, updated_at = $4, steps = steps + cardinality($5::integer[])
    WHERE instance_id = $1 AND lease_id = $2
    RETURNING cancel_requested
), claimed AS (
    UPDATE {schema}.geste_channel_messages SET claimed_by = $1
    WHERE seq = $12 AND claimed_by IS NULL AND $14 AND EXISTS (SELECT 1 FROM lease)
    RETURNING seq
), taken AS (
    SELECT EXISTS (SELECT 1 FROM lease) AND (NOT $14 OR EXISTS (SELECT 1 FROM claimed)) AS ok
), advanced AS (
    UPDATE {schema}.geste_channel_subscriptions
    SET cursor_seq = CASE WHEN $13 THEN cursor_seq ELSE GREATEST(cursor_seq, $12) END, waiting_since = NULL
    WHERE channel = $11 AND instance_id = $1 AND (SELECT ok FROM taken)
), rows AS (
    INSERT INTO {schema}.geste_history (instance_id, seq, kind, name, payload, is_error, created_at)
    SELECT $1, r.* FROM unnest($5::integer[], $6::text[], $7::text[], $8::text[], $9::boolean[],
                               $10::double precision[]) AS r
    WHERE (SELECT ok FROM taken)
)
SELECT (SELECT cancel_requested FROM lease) AS cancel_requested, (SELECT ok FROM taken) AS taken;

-- name: channel_set_waiting
-- The instance waits on this channel, and on no other (a wait it left without taking a message or
-- timing out, by catching its cancellation, must not wake it).
UPDATE {schema}.geste_channel_subscriptions
SET waiting_since = CASE WHEN channel = $1 THEN $3::double precision END
WHERE instance_id = $2 AND (channel = $1 OR waiting_since IS NOT NULL);

-- name: channel_stop_waiting
-- A receive timed out: its wait ends, only while the lease ($3) is still the instance's (a worker whose
-- lease was taken over must not end the new holder's wait). Returns the row when it was.
UPDATE {schema}.geste_channel_subscriptions SET waiting_since = NULL
WHERE channel = $1 AND instance_id = $2
  AND EXISTS (SELECT 1 FROM {schema}.geste_instances WHERE instance_id = $2 AND lease_id = $3)
RETURNING instance_id;

-- name: channel_publish
-- A publish in one statement (after channel_lock): with a lease (ctx.publish / ctx.send_to) renew it and
-- append the step's rows; store the message (once per id; nothing at all when the target of a direct
-- message does not exist); make its receivers runnable: the target, or every waiting broadcast
-- subscriber and the competing one idle the longest; then one geste_channel_message notification per
-- woken instance that can be claimed (nobody holds its lease), naming it and its last worker, which
-- claims it (schema 13: one notification per publish woke every worker).
-- $1 message_id, $2 channel, $3 data, $4 sender, $5 target, $6 now, $7 notify, $8 instance_id (lease),
-- $9 lease_id, $10 lock_expires_at, $11..$16 history columns.
-- Returns (target exists, stored, cancel_requested or NULL without a lease / lease lost, woken ids).
WITH target_ok AS (
    SELECT $5::text IS NULL
           OR EXISTS (SELECT 1 FROM {schema}.geste_instances WHERE instance_id = $5) AS ok
), lease AS (
    UPDATE {schema}.geste_instances
    SET lock_expires_at = $10, updated_at = $6, steps = steps + cardinality($11::integer[])
    WHERE $8::text IS NOT NULL AND instance_id = $8 AND lease_id = $9 AND (SELECT ok FROM target_ok)
    RETURNING cancel_requested
), proceed AS (
    SELECT (SELECT ok FROM target_ok) AND ($8::text IS NULL OR EXISTS (SELECT 1 FROM lease)) AS ok
), rows AS (
    INSERT INTO {schema}.geste_history (instance_id, seq, kind, name, payload, is_error, created_at)
    SELECT $8, r.* FROM unnest($11::integer[], $12::text[], $13::text[], $14::text[], $15::boolean[],
                               $16::double precision[]) AS r
    WHERE EXISTS (SELECT 1 FROM lease)
), inserted AS (
    INSERT INTO {schema}.geste_channel_messages
        (message_id, channel, data, sender_instance_id, target_instance_id, created_at)
    SELECT $1, $2, $3, $4, $5, $6 WHERE (SELECT ok FROM proceed)
    ON CONFLICT (message_id) DO NOTHING
    RETURNING seq
), chosen AS (
    SELECT s.instance_id FROM {schema}.geste_channel_subscriptions s
    WHERE s.channel = $2 AND s.waiting_since IS NOT NULL AND EXISTS (SELECT 1 FROM inserted)
      AND CASE WHEN $5::text IS NOT NULL THEN s.instance_id = $5 ELSE s.mode = 'broadcast' END
    UNION ALL
    (SELECT s.instance_id FROM {schema}.geste_channel_subscriptions s
     JOIN {schema}.geste_instances i ON i.instance_id = s.instance_id
     WHERE $5::text IS NULL AND s.channel = $2 AND s.mode = 'competing' AND s.waiting_since IS NOT NULL
       AND i.status = 'waiting' AND (i.run_at IS NULL OR i.run_at > LEAST($6, {db_clock}))
       AND EXISTS (SELECT 1 FROM inserted)
     ORDER BY s.waiting_since LIMIT 1)
), woken AS (
    UPDATE {schema}.geste_instances SET run_at = LEAST($6, {db_clock}), updated_at = $6
    WHERE instance_id IN (SELECT instance_id FROM chosen) AND status = 'waiting'
      AND (run_at IS NULL OR run_at > LEAST($6, {db_clock}))
    RETURNING instance_id, lease_id, coalesce(runner, workflow_name) AS runner, last_worker
), notified AS (
    SELECT pg_notify('geste_channel_message',
                     json_build_object('channel_name', $2::text, 'message_id', $1::text,
                                       'target_instance_id', $5::text, 'instance_id', instance_id,
                                       'workflow_name', runner, 'worker', last_worker,
                                       'schema', {schema_name})::text)
    FROM woken WHERE $7 AND lease_id IS NULL
)
SELECT (SELECT ok FROM target_ok) AS target_ok, EXISTS (SELECT 1 FROM inserted) AS stored,
       (SELECT cancel_requested FROM lease) AS cancel_requested, ARRAY(SELECT instance_id FROM woken) AS woken,
       (SELECT count(*) FROM notified) AS notified;

-- name: channel_rewake
-- The net under "a publish wakes one competing receiver": idle competing receivers for which an older
-- message is still unclaimed (the receiver woken for it did not take it: cancelled, failed). Per channel
-- with a waiting subscriber (a loose scan of geste_channel_subscriptions_waiting: one probe per channel),
-- the lowest cursor of its waiting competing subscribers (geste_channel_subscriptions_by_cursor), then the
-- first message after it that nobody took, older than $2 (geste_channel_messages_unclaimed: it holds the
-- messages not taken yet, so it reads past the fresh ones only); the waiting competing subscribers whose
-- cursor is before that message are woken, at most $3. A message published before every competing
-- subscriber subscribed is before every cursor: never read. Schema 11; before, it read every waiting
-- competing subscription, and every message after each one's cursor, taken or not.
WITH RECURSIVE channels(name) AS (
    SELECT min(channel) FROM {schema}.geste_channel_subscriptions WHERE waiting_since IS NOT NULL
    UNION ALL
    SELECT (SELECT min(s.channel) FROM {schema}.geste_channel_subscriptions s
            WHERE s.waiting_since IS NOT NULL AND s.channel > c.name)
    FROM channels c WHERE c.name IS NOT NULL
), lowest AS MATERIALIZED (  -- once per channel (inlined, it ran once per subscription of the join)
    SELECT c.name AS channel,
           (SELECT s.cursor_seq FROM {schema}.geste_channel_subscriptions s
            WHERE s.channel = c.name AND s.mode = 'competing' AND s.waiting_since IS NOT NULL
            ORDER BY s.channel, s.mode, s.cursor_seq LIMIT 1) AS cursor_seq
    FROM channels c WHERE c.name IS NOT NULL
), leftover AS MATERIALIZED (
    SELECT l.channel,
           (SELECT m.seq FROM {schema}.geste_channel_messages m
            WHERE m.channel = l.channel AND m.seq > l.cursor_seq AND m.target_instance_id IS NULL
              AND m.claimed_by IS NULL AND m.created_at < $2
            ORDER BY m.channel, m.seq LIMIT 1) AS seq
    FROM lowest l WHERE l.cursor_seq IS NOT NULL
), chosen AS (
    -- per channel with a leftover message, its waiting competing subscribers before it, in cursor order
    -- (geste_channel_subscriptions_by_cursor), each with a probe of its instance (a scalar subquery: a
    -- join hashed every waiting subscription with every waiting instance, 0.2 s at 10,000 of each)
    SELECT w.instance_id
    FROM leftover l
    CROSS JOIN LATERAL (
        SELECT s.instance_id
        FROM {schema}.geste_channel_subscriptions s
        WHERE s.channel = l.channel AND s.mode = 'competing' AND s.cursor_seq < l.seq
          AND s.waiting_since IS NOT NULL
          AND (SELECT i.status = 'waiting' AND i.lease_id IS NULL AND (i.run_at IS NULL OR i.run_at > $1)
               FROM {schema}.geste_instances i WHERE i.instance_id = s.instance_id)
        ORDER BY s.channel, s.mode, s.cursor_seq
        LIMIT $3
    ) w
    WHERE l.seq IS NOT NULL
    LIMIT $3
)
UPDATE {schema}.geste_instances SET run_at = $1, updated_at = $1
WHERE instance_id = ANY(ARRAY(SELECT instance_id FROM chosen))  -- by key: IN (..) let it hash the table
  AND status = 'waiting' AND lease_id IS NULL
RETURNING instance_id;

-- name: channel_cleanup_subscriptions
-- Maintenance, bounded like every cleanup: of the $3 subscriptions after the key ($1, $2) in key order
-- (a range of the primary key), those of finished (or deleted) instances, each a probe of its instance.
-- A round reads $3 subscriptions whatever the table holds; the next goes on after the last one read
-- (returned), from the start again once a round reads fewer (schema 11; before, each round joined
-- every subscription with its instance).
WITH examined AS MATERIALIZED (
    SELECT s.ctid AS row, s.channel, s.instance_id,
           -- a probe of its instance per row: a scalar subquery, never hashed (a NOT EXISTS was, over a
           -- scan of every instance)
           coalesce((SELECT i.status FROM {schema}.geste_instances i WHERE i.instance_id = s.instance_id)
                    IN ('completed', 'failed', 'cancelled'), true) AS gone
    FROM {schema}.geste_channel_subscriptions s
    WHERE (s.channel, s.instance_id) > ($1, $2)
    ORDER BY s.channel, s.instance_id
    LIMIT $3
), deleted AS (  -- the rows read, by their address (a join let the planner scan the table)
    DELETE FROM {schema}.geste_channel_subscriptions
    WHERE ctid = ANY(ARRAY(SELECT row FROM examined WHERE gone))
    RETURNING 1
), last AS (
    SELECT channel, instance_id FROM examined ORDER BY channel DESC, instance_id DESC LIMIT 1
)
SELECT (SELECT count(*) FROM deleted) AS deleted, (SELECT count(*) FROM examined) AS examined,
       (SELECT channel FROM last) AS last_channel, (SELECT instance_id FROM last) AS last_instance;

-- name: channel_cleanup_messages
-- Messages past the retention ($1) that no subscriber needs: a direct one once taken or its target
-- finished; another once no broadcast subscriber's cursor is before it and, unless it was taken, no
-- competing subscriber's either (the lowest cursor of each mode: two probes of
-- geste_channel_subscriptions_by_cursor, however many subscribers the channel has). It reads the $4
-- oldest messages after the key ($2, $3) in (created_at, seq) order, through
-- geste_channel_messages_by_created: those kept for a subscriber are stepped over by the next round (it
-- goes on after the last one read, returned), and read again once a round reaches the end (reads fewer)
-- and the next starts over (schema 11; before, every round read the kept messages again from the first,
-- and each subscription of their channels).
WITH examined AS MATERIALIZED (
    SELECT m.seq, m.created_at, m.channel, m.target_instance_id, m.claimed_by
    FROM {schema}.geste_channel_messages m
    WHERE (m.created_at, m.seq) > ($2, $3) AND m.created_at < $1
    ORDER BY m.created_at, m.seq
    LIMIT $4
), deleted AS (  -- by primary key (= ANY(ARRAY(..)): "IN (..)" let the planner hash the table)
    DELETE FROM {schema}.geste_channel_messages WHERE seq = ANY(ARRAY(
        SELECT m.seq FROM examined m
        WHERE CASE  -- scalar subqueries, a probe per message, never hashed (an EXISTS was: a table scan)
            WHEN m.target_instance_id IS NOT NULL THEN m.claimed_by IS NOT NULL OR coalesce(
                (SELECT i.status FROM {schema}.geste_instances i WHERE i.instance_id = m.target_instance_id)
                IN ('completed', 'failed', 'cancelled'), true)
            ELSE coalesce((SELECT s.cursor_seq FROM {schema}.geste_channel_subscriptions s
                           WHERE s.channel = m.channel AND s.mode = 'broadcast'
                           ORDER BY s.channel, s.mode, s.cursor_seq LIMIT 1) >= m.seq, true)
                 AND (m.claimed_by IS NOT NULL
                      OR coalesce((SELECT s.cursor_seq FROM {schema}.geste_channel_subscriptions s
                                   WHERE s.channel = m.channel AND s.mode = 'competing'
                                   ORDER BY s.channel, s.mode, s.cursor_seq LIMIT 1) >= m.seq, true))
            END))
    RETURNING 1
), last AS (
    SELECT created_at, seq FROM examined ORDER BY created_at DESC, seq DESC LIMIT 1
)
SELECT (SELECT count(*) FROM deleted) AS deleted, (SELECT count(*) FROM examined) AS examined,
       (SELECT created_at FROM last) AS last_at, (SELECT seq FROM last) AS last_seq;

-- name: channel_cleanup_events
-- Events past their retention, the oldest first (geste_events_by_created, schema 11: before, a round
-- walked the events in seq order past every younger one when fewer than $2 were old), with their
-- deliveries (geste_event_deliveries_by_event); returns the events and the rows deleted.
WITH events AS (
    DELETE FROM {schema}.geste_events WHERE seq = ANY(ARRAY(
        SELECT seq FROM {schema}.geste_events WHERE created_at < $1 ORDER BY created_at LIMIT $2
    ))
    RETURNING seq
), deliveries AS (
    DELETE FROM {schema}.geste_event_deliveries WHERE event_seq = ANY(ARRAY(SELECT seq FROM events))
    RETURNING 1
), keys AS (  -- their match keys (12), not counted: the count bounds the rounds as before
    DELETE FROM {schema}.geste_event_keys WHERE event_seq = ANY(ARRAY(SELECT seq FROM events))
)
SELECT (SELECT count(*) FROM events) AS events,
       (SELECT count(*) FROM events) + (SELECT count(*) FROM deliveries) AS deleted;

-- == the retention of finished instances (schema 29) ==================================================

-- name: prune_instances
-- One bounded batch of the retention (docs/design.md "Retention of finished instances"): of the $4
-- finished instances (completed, failed, cancelled) that ended before $1, after the position ($2, $3) in
-- (finished_at, instance_id) order (a range of geste_instances_finished: no unfinished row is read),
-- those nothing still needs are deleted with every row of theirs; $5 false: none is (a dry run), the
-- count is the same. An instance is kept while its parent is unfinished (the parent reads its outcome),
-- while one of its children is unfinished (it reports to it), and while its outbox holds a pending or
-- dead event (the relay or an operator still sends it); each a probe by index per instance read
-- (geste_instances pkey, geste_instances_by_parent up to the first unfinished child,
-- geste_outbox_pending_by_instance, geste_outbox_dead_by_instance), as scalar subqueries (never hashed).
-- A kept instance is stepped over: the next batch goes on after the last one read (returned), from the
-- start again once a batch reads fewer than $4. The DELETE of the instances checks their status again
-- under their row locks (an operator's retry that committed first keeps its instance), and the rows of
-- the other tables go by the instances it deleted, each through an index led by instance_id. Channel
-- messages are not an instance's: the channel cleanup deletes them once no subscriber needs them.
WITH examined AS MATERIALIZED (
    SELECT i.instance_id, i.finished_at,
           (i.parent_id IS NULL
            OR coalesce((SELECT p.status FROM {schema}.geste_instances p WHERE p.instance_id = i.parent_id)
                        IN ('completed', 'failed', 'cancelled'), true))
           AND (SELECT c.instance_id FROM {schema}.geste_instances c
                WHERE c.parent_id = i.instance_id AND c.status IN ('pending', 'running', 'waiting', 'compensating')
                LIMIT 1) IS NULL
           AND (SELECT o.step_seq FROM {schema}.geste_outbox o
                WHERE o.instance_id = i.instance_id AND o.status = 'pending' LIMIT 1) IS NULL
           AND (SELECT o.step_seq FROM {schema}.geste_outbox o
                WHERE o.instance_id = i.instance_id AND o.status = 'dead' LIMIT 1) IS NULL AS free
    FROM {schema}.geste_instances i
    WHERE i.status IN ('completed', 'failed', 'cancelled') AND i.finished_at < $1
      AND (i.finished_at, i.instance_id) > ($2, $3)
    ORDER BY i.finished_at, i.instance_id
    LIMIT $4
), gone AS (  -- by primary key (= ANY(ARRAY(..)): "IN (..)" let the planner hash the table)
    DELETE FROM {schema}.geste_instances
    WHERE instance_id = ANY(ARRAY(SELECT instance_id FROM examined WHERE free AND $5::boolean))
      AND status IN ('completed', 'failed', 'cancelled')
    RETURNING instance_id
), history AS (
    DELETE FROM {schema}.geste_history WHERE instance_id = ANY(ARRAY(SELECT instance_id FROM gone))
    RETURNING 1
), runs AS (
    DELETE FROM {schema}.geste_runs WHERE instance_id = ANY(ARRAY(SELECT instance_id FROM gone))
    RETURNING 1
), run_history AS (
    DELETE FROM {schema}.geste_run_history WHERE instance_id = ANY(ARRAY(SELECT instance_id FROM gone))
    RETURNING 1
), timers AS (
    DELETE FROM {schema}.geste_timers WHERE instance_id = ANY(ARRAY(SELECT instance_id FROM gone))
    RETURNING 1
), event_waits AS (
    DELETE FROM {schema}.geste_event_waits WHERE instance_id = ANY(ARRAY(SELECT instance_id FROM gone))
    RETURNING 1
), deliveries AS (
    DELETE FROM {schema}.geste_event_deliveries WHERE instance_id = ANY(ARRAY(SELECT instance_id FROM gone))
    RETURNING 1
), subscriptions AS (
    DELETE FROM {schema}.geste_channel_subscriptions
    WHERE instance_id = ANY(ARRAY(SELECT instance_id FROM gone))
    RETURNING 1
), outbox AS (
    DELETE FROM {schema}.geste_outbox
    WHERE instance_id = ANY(ARRAY(SELECT instance_id FROM gone)) AND status IN ('delivered', 'discarded')
    RETURNING 1
), retries AS (
    DELETE FROM {schema}.geste_retries WHERE instance_id = ANY(ARRAY(SELECT instance_id FROM gone))
    RETURNING 1
), waiters AS (
    DELETE FROM {schema}.geste_result_waiters WHERE instance_id = ANY(ARRAY(SELECT instance_id FROM gone))
    RETURNING 1
), state AS (
    DELETE FROM {schema}.geste_state WHERE instance_id = ANY(ARRAY(SELECT instance_id FROM gone))
    RETURNING 1
), streams AS (
    DELETE FROM {schema}.geste_streams WHERE instance_id = ANY(ARRAY(SELECT instance_id FROM gone))
    RETURNING 1
), heads AS (
    DELETE FROM {schema}.geste_stream_heads WHERE instance_id = ANY(ARRAY(SELECT instance_id FROM gone))
    RETURNING 1
), readers AS (
    DELETE FROM {schema}.geste_stream_readers WHERE instance_id = ANY(ARRAY(SELECT instance_id FROM gone))
    RETURNING 1
), last AS (
    SELECT finished_at, instance_id FROM examined ORDER BY finished_at DESC, instance_id DESC LIMIT 1
)
SELECT (SELECT count(*) FROM examined) AS examined,
       (SELECT count(*) FROM examined WHERE free) AS free,
       (SELECT count(*) FROM gone) AS instances,
       (SELECT count(*) FROM gone) + (SELECT count(*) FROM history) + (SELECT count(*) FROM runs)
       + (SELECT count(*) FROM run_history) + (SELECT count(*) FROM timers)
       + (SELECT count(*) FROM event_waits) + (SELECT count(*) FROM deliveries)
       + (SELECT count(*) FROM subscriptions) + (SELECT count(*) FROM outbox)
       + (SELECT count(*) FROM retries) + (SELECT count(*) FROM waiters) + (SELECT count(*) FROM state)
       + (SELECT count(*) FROM streams) + (SELECT count(*) FROM heads) + (SELECT count(*) FROM readers)
       AS deleted,
       (SELECT finished_at FROM last) AS last_at, (SELECT instance_id FROM last) AS last_id;

-- == chores (schema 11) ===============================================================================
-- Each periodic chore (runtime/chores.py) runs in one worker of the cluster at a time: a round is taken
-- with one upsert of its row in geste_chores, by primary key, whatever the tables hold.

-- name: chore_take
-- Take the chore $1 for worker $2 at $3 if its round is due: the next one is then due at $3 + $4. The
-- worker that took the last round (the holder) takes it at next_at; another once the holder is $5 late
-- (it died or stalls), or once it gave the chore back (holder NULL). A row locked by a concurrent take is
-- waited for, then judged as it left it. Returns (taken, next_at, holder): the row as it is after the
-- take, or as this statement's snapshot saw it when not taken (the worker tries again at next_at, or at
-- next_at + $5 when another holds it).
WITH taken AS (
    INSERT INTO {schema}.geste_chores AS c (chore, holder, next_at, taken_at)
    VALUES ($1::text, $2::text, $3::double precision + $4::double precision, $3::double precision)
    ON CONFLICT (chore) DO UPDATE
    SET holder = excluded.holder, next_at = excluded.next_at, taken_at = excluded.taken_at
    WHERE c.next_at <= $3 AND (c.holder IS NULL OR c.holder = $2 OR c.next_at + $5::double precision <= $3)
    RETURNING c.next_at, c.holder
)
SELECT true AS taken, next_at, holder FROM taken
UNION ALL
SELECT false, next_at, holder FROM {schema}.geste_chores
WHERE chore = $1 AND NOT EXISTS (SELECT 1 FROM taken);

-- name: chore_release
-- A worker that stops gives its chores back: another takes each at its next round, without waiting.
UPDATE {schema}.geste_chores SET holder = NULL WHERE holder = $1;

-- == the web viewer (migration 6) ===================================================================
-- Keyset pages of instances, newest first by (created_at, instance_id): one query per filter
-- combination, each with its own index, so that a prepared statement's plan never depends on which
-- filters are set. The key bounds the page on one side and the created_at range on the other (the
-- caller folds the range's other end into the key). The row comparison starts with the filter's
-- equality columns, as the index does: PostgreSQL takes a row comparison as an index condition only
-- from the index's first column on (else it reads the filter's whole range and filters it).

-- name: page_instances_all_older
-- Through geste_instances_by_created: a range scan of the index, from the key down.
SELECT instance_id, workflow_name, status, created_at, updated_at, finished_at, locked_by,
       cancel_requested, steps, substr(input, 1, $5) AS input_head
FROM {schema}.geste_instances
WHERE (created_at, instance_id) < ($1, $2) AND created_at >= $3
ORDER BY created_at DESC, instance_id DESC
LIMIT $4;

-- name: page_instances_all_newer
-- Through geste_instances_by_created, from the key up (the caller reverses the page).
SELECT instance_id, workflow_name, status, created_at, updated_at, finished_at, locked_by,
       cancel_requested, steps, substr(input, 1, $5) AS input_head
FROM {schema}.geste_instances
WHERE (created_at, instance_id) > ($1, $2) AND created_at < $3
ORDER BY created_at, instance_id
LIMIT $4;

-- name: page_instances_workflow_older
-- Through geste_instances_by_name: a range scan of the index, from the key down.
SELECT instance_id, workflow_name, status, created_at, updated_at, finished_at, locked_by,
       cancel_requested, steps, substr(input, 1, $5) AS input_head
FROM {schema}.geste_instances
WHERE (workflow_name, created_at, instance_id) < ($6, $1, $2)
  AND workflow_name = $6 AND created_at >= $3
ORDER BY created_at DESC, instance_id DESC
LIMIT $4;

-- name: page_instances_workflow_newer
-- Through geste_instances_by_name, from the key up (the caller reverses the page).
SELECT instance_id, workflow_name, status, created_at, updated_at, finished_at, locked_by,
       cancel_requested, steps, substr(input, 1, $5) AS input_head
FROM {schema}.geste_instances
WHERE (workflow_name, created_at, instance_id) > ($6, $1, $2)
  AND workflow_name = $6 AND created_at < $3
ORDER BY created_at, instance_id
LIMIT $4;

-- name: page_instances_status_older
-- Through geste_instances_by_status: a range scan of the index, from the key down.
SELECT instance_id, workflow_name, status, created_at, updated_at, finished_at, locked_by,
       cancel_requested, steps, substr(input, 1, $5) AS input_head
FROM {schema}.geste_instances
WHERE (status, created_at, instance_id) < ($6, $1, $2)
  AND status = $6 AND created_at >= $3
ORDER BY created_at DESC, instance_id DESC
LIMIT $4;

-- name: page_instances_status_newer
-- Through geste_instances_by_status, from the key up (the caller reverses the page).
SELECT instance_id, workflow_name, status, created_at, updated_at, finished_at, locked_by,
       cancel_requested, steps, substr(input, 1, $5) AS input_head
FROM {schema}.geste_instances
WHERE (status, created_at, instance_id) > ($6, $1, $2)
  AND status = $6 AND created_at < $3
ORDER BY created_at, instance_id
LIMIT $4;

-- name: page_instances_workflow_status_older
-- Through geste_instances_by_name_status: a range scan of the index, from the key down.
SELECT instance_id, workflow_name, status, created_at, updated_at, finished_at, locked_by,
       cancel_requested, steps, substr(input, 1, $5) AS input_head
FROM {schema}.geste_instances
WHERE (workflow_name, status, created_at, instance_id) < ($6, $7, $1, $2)
  AND workflow_name = $6 AND status = $7 AND created_at >= $3
ORDER BY created_at DESC, instance_id DESC
LIMIT $4;

-- name: page_instances_workflow_status_newer
-- Through geste_instances_by_name_status, from the key up (the caller reverses the page).
SELECT instance_id, workflow_name, status, created_at, updated_at, finished_at, locked_by,
       cancel_requested, steps, substr(input, 1, $5) AS input_head
FROM {schema}.geste_instances
WHERE (workflow_name, status, created_at, instance_id) > ($6, $7, $1, $2)
  AND workflow_name = $6 AND status = $7 AND created_at < $3
ORDER BY created_at, instance_id
LIMIT $4;

-- name: count_instances_all
-- Per status (the names in $4), at most $3 entries of geste_instances_by_status read: a count that
-- costs the same on a million instances as on a thousand, and says "at least $3" beyond. The ORDER BY
-- is the index's: without it a plan made for a frequent status (a generic one: the status comes from
-- the outer row) may scan the table and stop at the limit, which for a rare status reads it all.
SELECT s.status, (
    SELECT count(*) FROM (
        SELECT 1 FROM {schema}.geste_instances i
        WHERE i.status = s.status AND i.created_at >= $1 AND i.created_at < $2
        ORDER BY i.created_at
        LIMIT $3
    ) AS capped
) AS n
FROM unnest($4::text[]) AS s(status);

-- name: count_instances_workflow
-- As count_instances_all for one workflow name ($5), through geste_instances_by_name_status.
SELECT s.status, (
    SELECT count(*) FROM (
        SELECT 1 FROM {schema}.geste_instances i
        WHERE i.workflow_name = $5 AND i.status = s.status AND i.created_at >= $1 AND i.created_at < $2
        ORDER BY i.created_at
        LIMIT $3
    ) AS capped
) AS n
FROM unnest($4::text[]) AS s(status);

-- name: runnable_workflows
-- The workflow names that have instances runnable at $1 (lease free or expired, a status this version
-- knows), each with how many, counted up to $2: a loose index scan of geste_instances_runnable_by_name
-- and geste_instances_leased_by_name (one probe of each per distinct name), then at most $2 entries of
-- each index per name, the two ranges a claim reads (matched and ordered as in the claim, so that the
-- planner can neither walk another index nor scan the table).
WITH RECURSIVE names(name) AS (  -- a loose scan of both indexes: one probe of each per distinct name
    SELECT LEAST((SELECT min(coalesce(runner, workflow_name)) FROM {schema}.geste_instances
                  WHERE run_at IS NOT NULL AND lease_id IS NULL
                    AND status IN ('pending', 'running', 'waiting', 'compensating')),
                 (SELECT min(coalesce(runner, workflow_name)) FROM {schema}.geste_instances
                  WHERE lease_id IS NOT NULL AND status IN ('pending', 'running', 'waiting', 'compensating')))
    UNION ALL
    SELECT LEAST((SELECT min(coalesce(i.runner, i.workflow_name)) FROM {schema}.geste_instances i
                  WHERE i.run_at IS NOT NULL AND i.lease_id IS NULL AND coalesce(i.runner, i.workflow_name) > n.name
                    AND i.status IN ('pending', 'running', 'waiting', 'compensating')),
                 (SELECT min(coalesce(i.runner, i.workflow_name)) FROM {schema}.geste_instances i
                  WHERE i.lease_id IS NOT NULL AND coalesce(i.runner, i.workflow_name) > n.name
                    AND i.status IN ('pending', 'running', 'waiting', 'compensating')))
    FROM names n WHERE n.name IS NOT NULL
)
SELECT n.name AS workflow_name, LEAST($2, (SELECT count(*) FROM (
    SELECT 1 FROM {schema}.geste_instances i
    WHERE coalesce(i.runner, i.workflow_name) = ANY(ARRAY[n.name]) AND i.lease_id IS NULL AND i.run_at <= $1
      AND i.status IN ('pending', 'running', 'waiting', 'compensating')
    ORDER BY coalesce(i.runner, i.workflow_name), i.run_at LIMIT $2) AS c) + (SELECT count(*) FROM (
    SELECT 1 FROM {schema}.geste_instances i
    WHERE coalesce(i.runner, i.workflow_name) = ANY(ARRAY[n.name]) AND i.lease_id IS NOT NULL AND i.run_at <= $1
      AND i.lock_expires_at <= $1 AND i.status IN ('pending', 'running', 'waiting', 'compensating')
    ORDER BY coalesce(i.runner, i.workflow_name), i.run_at LIMIT $2) AS e)) AS runnable
FROM names n WHERE n.name IS NOT NULL LIMIT $3;

-- name: workflow_names
-- A loose index scan of geste_instances_by_name: one probe per distinct name, never every instance.
WITH RECURSIVE names(name) AS (
    SELECT min(workflow_name) FROM {schema}.geste_instances
    UNION ALL
    SELECT (SELECT min(i.workflow_name) FROM {schema}.geste_instances i WHERE i.workflow_name > n.name)
    FROM names n WHERE n.name IS NOT NULL
)
SELECT name FROM names WHERE name IS NOT NULL LIMIT $1;

-- name: extras_timers
SELECT seq, expires_at FROM {schema}.geste_timers WHERE instance_id = $1 ORDER BY expires_at, seq;

-- name: extras_event_wait
SELECT event_type, match, since, deadline FROM {schema}.geste_event_waits WHERE instance_id = $1;

-- name: extras_subscriptions
SELECT channel, mode, cursor_seq, waiting_since, created_at
FROM {schema}.geste_channel_subscriptions WHERE instance_id = $1 ORDER BY channel;

-- name: extras_outbox
-- By primary key: the ids of the events the instance emitted, read from its history.
SELECT event_id, instance_id, step_seq, event_type, source, subject, data, status, attempts,
       next_attempt_at, last_error, created_at, updated_at, delivered_at, claimed_by
FROM {schema}.geste_outbox WHERE event_id = ANY($1::text[]) ORDER BY step_seq;

-- name: extras_messages
-- By their unique message_id: the messages the instance published (those not yet deleted).
SELECT message_id, channel, data, sender_instance_id, target_instance_id, created_at, claimed_by
FROM {schema}.geste_channel_messages WHERE message_id = ANY($1::text[]) ORDER BY seq;

-- Child workflows (16; docs/design.md, "Child workflows").

-- name: start_child
-- ctx.start_child in one statement: the child is created free and runnable (notified to any worker, as a
-- client's start), or queued onto $17 (schema 20: run_at NULL, queued_at set, as insert_queued; the
-- notification names the queue), and, only if it was, the parent's rows are appended under its lease
-- (proved here, and renewed). Not created (its id is taken, or its queue's dedup id $19: ON CONFLICT
-- without a target covers the primary key and the dedup index): nothing else is written and the caller
-- reads who has it. The lease lost: the child stays and its parent's next holder, replaying the step with
-- the same id, finds it its own (parent_id, workflow) and records the step then. One probe of the primary
-- key each (and of the dedup index for a queued child).
-- $1-$3: the child's id, workflow, input; $4: now; $5 the parent, $6 its lease, $7 the lease's new expiry;
-- $8-$13 the history columns; $14 the policy; $15 notify; $16 the child's deadline (17; NULL: none);
-- $17-$19 its queue, priority and dedup id (20; NULL queue: none); $20 its partition of the queue (22:
-- '' without a key; the first start of a key makes the key's row, as insert_queued does); $21-$22 its
-- version and whether it is pinned to it (27); $23 its trace context (30: docs/tracing.md).
WITH inserted AS (
    INSERT INTO {schema}.geste_instances
        (instance_id, workflow_name, status, input, created_at, updated_at, run_at, event_floor,
         parent_id, parent_close, deadline, queue, priority, queued_at, dedup_id, partition_key, version,
         pinned, trace_context)
    VALUES ($1, $2, 'pending', $3, $4, $4,
            CASE WHEN $17::text IS NULL THEN LEAST($4, {db_clock}) END,
            nextval('{schema}.geste_events_seq_seq'), $5, $14, $16,
            $17, $18, CASE WHEN $17::text IS NOT NULL THEN $4::double precision END, $19,
            CASE WHEN $17::text IS NOT NULL THEN $20::text END, $21, $22, $23)
    ON CONFLICT DO NOTHING
    RETURNING instance_id, runner
), partition AS (
    INSERT INTO {schema}.geste_queue_partitions (queue, key)
    SELECT $17, $20 FROM inserted WHERE $17::text IS NOT NULL AND $20::text <> ''
    ON CONFLICT DO NOTHING
), touched AS (
    UPDATE {schema}.geste_instances
    SET lock_expires_at = $7, updated_at = $4, steps = steps + cardinality($8::integer[])
    WHERE instance_id = $5 AND lease_id = $6 AND EXISTS (SELECT 1 FROM inserted)
    RETURNING cancel_requested
), rows AS (
    INSERT INTO {schema}.geste_history (instance_id, seq, kind, name, payload, is_error, created_at)
    SELECT $5, r.* FROM unnest($8::integer[], $9::text[], $10::text[], $11::text[], $12::boolean[],
                               $13::double precision[]) AS r
    WHERE EXISTS (SELECT 1 FROM touched)
), notified AS (
    SELECT pg_notify('geste_workflow_resumable',
                     CASE WHEN $17::text IS NULL
                          THEN json_build_object('instance_id', $1::text,
                                                 'workflow_name', coalesce(runner, $2::text),
                                                 'worker', NULL, 'schema', {schema_name})
                          ELSE json_build_object('queue', $17::text, 'instance_id', $1::text,
                                                 'schema', {schema_name})
                     END::text)
    FROM inserted WHERE $15
)
SELECT EXISTS (SELECT 1 FROM inserted) AS created, EXISTS (SELECT 1 FROM touched) AS touched,
       (SELECT bool_or(cancel_requested) FROM touched) AS cancel_requested,
       (SELECT count(*) FROM notified) AS notified;

-- name: child_state
-- The state of an awaited child: one probe of the primary key.
SELECT workflow_name, status, result, error, parent_id FROM {schema}.geste_instances WHERE instance_id = $1;

-- name: list_children
-- The children of an instance, oldest first: a range of geste_instances_by_parent (partial: parent_id set).
SELECT instance_id, workflow_name, status, input, result, error, created_at, updated_at, finished_at,
       run_at, locked_by, lock_expires_at, cancel_requested, steps, run, last_worker, parent_id, deadline
FROM {schema}.geste_instances
WHERE parent_id = $1
ORDER BY created_at, instance_id
LIMIT $2;

-- == cron schedules (migration 19) ================================================================
-- name: schedule_upsert
-- A declared schedule (at App open) or app.create_schedule: its definition written; its next tick kept
-- while it ticks at the same moments (a restart does not lose the ticks it missed), recomputed otherwise.
-- A paused schedule stays paused.
INSERT INTO {schema}.geste_schedules AS s
    (name, workflow_name, cron, timezone, missed, overlap, pass_tick, next_tick, created_at, updated_at,
     queue, priority)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, $10, $11)
ON CONFLICT (name) DO UPDATE
SET workflow_name = excluded.workflow_name, missed = excluded.missed, overlap = excluded.overlap,
    pass_tick = excluded.pass_tick, updated_at = excluded.updated_at, queue = excluded.queue,
    priority = excluded.priority,
    next_tick = CASE WHEN s.cron = excluded.cron AND s.timezone = excluded.timezone
                     THEN s.next_tick ELSE excluded.next_tick END,
    cron = excluded.cron, timezone = excluded.timezone;

-- name: schedules_due
-- Through geste_schedules_due: the due schedules, earliest first, at most $2.
SELECT name, workflow_name, cron, timezone, missed, overlap, pass_tick, paused, next_tick, last_tick,
       last_instance_id, queue, priority, waiting
FROM {schema}.geste_schedules WHERE NOT paused AND next_tick <= $1
ORDER BY next_tick LIMIT $2;

-- name: schedule_next_tick
-- Through geste_schedules_due: its first entry.
SELECT min(next_tick) AS next_tick FROM {schema}.geste_schedules WHERE NOT paused;

-- name: schedule_advance
-- The round's claim on a tick: moves next_tick from the value it read ($3). A concurrent round waits for
-- the row, then finds it moved (READ COMMITTED reads the row again) and updates nothing.
UPDATE {schema}.geste_schedules SET next_tick = $2, updated_at = $4
WHERE name = $1 AND next_tick = $3 AND NOT paused
RETURNING last_instance_id, waiting;

-- name: schedule_started
UPDATE {schema}.geste_schedules SET last_tick = $2, last_instance_id = $3 WHERE name = $1;

-- name: schedule_last_unfinished
-- Whether the schedule's last instance has not ended (overlap skip and queue): one primary-key probe.
SELECT 1 FROM {schema}.geste_instances
WHERE instance_id = $1 AND status IN ('pending', 'running', 'waiting', 'compensating');

-- name: schedule_wait
-- overlap = 'queue' (schema 24): ticks put to wait for the last run to end, in the round's transaction
-- (after schedule_advance: the schedule's row is locked), and counted in the row.
WITH added AS (
    INSERT INTO {schema}.geste_schedule_waiting (name, tick)
    SELECT $1, tick FROM unnest($2::double precision[]) AS t (tick)
    ON CONFLICT DO NOTHING
    RETURNING tick
)
UPDATE {schema}.geste_schedules SET waiting = waiting + (SELECT count(*) FROM added)
WHERE name = $1
RETURNING waiting;

-- name: schedules_waiting
-- Through geste_schedules_waiting: the unpaused schedules with ticks waiting, each with its oldest tick
-- (the primary key's first entry for the name) and whether its last run has ended (a probe by id); those
-- ended first. Reads every schedule with ticks waiting (the ORDER BY needs the probe of each).
SELECT s.name, s.workflow_name, s.cron, s.timezone, s.missed, s.overlap, s.pass_tick, s.paused,
       s.next_tick, s.last_tick, s.last_instance_id, s.queue, s.priority, s.waiting,
       (SELECT min(w.tick) FROM {schema}.geste_schedule_waiting AS w WHERE w.name = s.name) AS first_tick,
       NOT EXISTS (SELECT 1 FROM {schema}.geste_instances AS i
                   WHERE i.instance_id = s.last_instance_id
                     AND i.status IN ('pending', 'running', 'waiting', 'compensating')) AS ready
FROM {schema}.geste_schedules AS s
WHERE s.waiting > 0 AND NOT s.paused
ORDER BY ready DESC, s.name
LIMIT $1;

-- name: schedule_lock
-- A release's first statement: the schedule's row locked (the release of the same tick by another worker,
-- and a round's schedule_advance, wait for this transaction), then read.
SELECT paused, last_instance_id FROM {schema}.geste_schedules WHERE name = $1 FOR UPDATE;

-- name: schedule_unwait
-- A release (schema 24): the tick taken off the waiting ones; the row counts one less, and the tick's
-- instance is its last. No row: the tick was released already.
WITH taken AS (
    DELETE FROM {schema}.geste_schedule_waiting WHERE name = $1 AND tick = $2 RETURNING tick
)
UPDATE {schema}.geste_schedules
SET waiting = waiting - 1, last_tick = $2, last_instance_id = $3, updated_at = $4
WHERE name = $1 AND EXISTS (SELECT 1 FROM taken)
RETURNING waiting;

-- name: get_schedule
SELECT name, workflow_name, cron, timezone, missed, overlap, pass_tick, paused, next_tick, last_tick,
       last_instance_id, queue, priority, waiting
FROM {schema}.geste_schedules WHERE name = $1;

-- name: list_schedules
SELECT name, workflow_name, cron, timezone, missed, overlap, pass_tick, paused, next_tick, last_tick,
       last_instance_id, queue, priority, waiting
FROM {schema}.geste_schedules ORDER BY name LIMIT $1;

-- name: schedule_pause
UPDATE {schema}.geste_schedules SET paused = true, updated_at = $2 WHERE name = $1;

-- name: schedule_resume
-- Resumed: its next tick is the first to come (the ticks that passed while paused are not started).
UPDATE {schema}.geste_schedules SET paused = false, next_tick = $2, updated_at = $3 WHERE name = $1;

-- name: schedule_delete
-- The schedule and its waiting ticks (schema 24); its instances stay.
WITH waiting AS (DELETE FROM {schema}.geste_schedule_waiting WHERE name = $1)
DELETE FROM {schema}.geste_schedules WHERE name = $1;

-- name: queue_upsert
-- A declared queue's limits (App open, before its worker claims): the last App opened sets them.
-- The admission times of the window (starts) are kept. The row of its key-less partition is made here
-- (schema 22): the claims lock it, never insert it.
WITH partition AS (
    INSERT INTO {schema}.geste_queue_partitions (queue, key) VALUES ($1, '') ON CONFLICT DO NOTHING
)
INSERT INTO {schema}.geste_queues AS q
    (name, concurrency, worker_concurrency, rate_limit, rate_period, updated_at, partition_concurrency,
     partition_rate_limit)
VALUES ($1, $2, $3, $5, $6, $4, $7, $8)
ON CONFLICT (name) DO UPDATE
SET concurrency = excluded.concurrency, worker_concurrency = excluded.worker_concurrency,
    rate_limit = excluded.rate_limit, rate_period = excluded.rate_period, updated_at = excluded.updated_at,
    partition_concurrency = excluded.partition_concurrency,
    partition_rate_limit = excluded.partition_rate_limit;

-- name: insert_queued
-- A start onto a queue (schema 20): pending, queued (queued_at) and run_at NULL, so that no claim by
-- workflow or by id can take it: only geste_queue_claim admits it. ON CONFLICT DO NOTHING without a target
-- covers the primary key and the dedup index (one unfinished instance per queue and dedup id): nothing
-- inserted, the caller reads which of the two it met. The notification names the queue (and the instance,
-- which only spreads the starts over the serving workers: schema 23): one live worker serving the queue,
-- chosen by rendezvous on the instance id, runs a claim of the queue (nothing else can take the instance).
-- Its partition ($10: '' without a key, schema 22): the first start of a key makes the key's row (a probe
-- of its primary key afterwards), which the claims lock.
WITH inserted AS (
    INSERT INTO {schema}.geste_instances
        (instance_id, workflow_name, status, input, created_at, updated_at, run_at, event_floor, deadline,
         queue, priority, queued_at, dedup_id, partition_key, version, pinned, trace_context)
    VALUES ($1, $2, 'pending', $3, $4, $4, NULL, nextval('{schema}.geste_events_seq_seq'), $5,
            $6, $7, $4, $8, $10, $11, $12, $13)
    ON CONFLICT DO NOTHING
    RETURNING instance_id
), partition AS (
    INSERT INTO {schema}.geste_queue_partitions (queue, key)
    SELECT $6, $10 FROM inserted WHERE $10 <> ''
    ON CONFLICT DO NOTHING
), notified AS (
    SELECT pg_notify('geste_workflow_resumable',
                     json_build_object('queue', $6::text, 'instance_id', $1::text,
                                       'schema', {schema_name})::text)
    FROM inserted WHERE $9
)
SELECT instance_id, (SELECT count(*) FROM notified) AS notified FROM inserted;

-- name: find_dedup
-- The unfinished instance of a queue holding a dedup id (the unique partial index, one probe).
SELECT instance_id FROM {schema}.geste_instances
WHERE queue = $1 AND dedup_id = $2 AND status IN ('pending', 'running', 'waiting', 'compensating');

-- name: queue_runnable
-- A worker that serves no instance outside a queue (serve_unqueued=False) finds the instances it may run
-- here, not in the claim indexes of every workflow: those admitted by the queues it serves ($1) and
-- unfinished (geste_instances_queue_admitted: the slots in use), of the workflows it registers ($5), free
-- and due by $3 or held by a lease that ran out at $2, earliest first, at most $4 (claim_ids takes them,
-- under its lock); then one row with a NULL id, the earliest run_at after $3 among the free ones (its
-- sleep). Reads the queues' admitted entries: R per queue, at most its concurrency limit.
(SELECT instance_id, run_at FROM {schema}.geste_instances
 WHERE queue = ANY($1::text[]) AND queue IS NOT NULL AND queued_at IS NULL
   AND status IN ('pending', 'running', 'waiting', 'compensating') AND coalesce(runner, workflow_name) = ANY($5::text[])
   AND ((lease_id IS NULL AND run_at <= $3) OR (lease_id IS NOT NULL AND lock_expires_at <= $2))
 ORDER BY run_at
 LIMIT $4)
UNION ALL
SELECT NULL, min(run_at) FROM {schema}.geste_instances
WHERE queue = ANY($1::text[]) AND queue IS NOT NULL AND queued_at IS NULL
  AND status IN ('pending', 'running', 'waiting', 'compensating') AND coalesce(runner, workflow_name) = ANY($5::text[])
  AND lease_id IS NULL AND run_at > $3;

-- name: queue_claim
-- Admit and claim up to $2 queued instances of the queue $1 within its limit (geste_queue_claim, schema
-- 20: the row lock, then the count in a fresh snapshot, then the take). A queued instance has no history
-- yet; run_at is NULL (it was queued, not due: the wake-up latency counts from its start). A row with a
-- NULL instance_id is no claim: its run_at is when the queue's rate has room again.
SELECT * FROM {schema}.geste_queue_claim($1, $2, $3, $4, $5, $6);

-- name: list_queues
-- The queues by name, at most $3 (geste status, the metrics, the viewer, app.list_queues): those declared
-- (geste_queues) and those named by queued or admitted instances, found by a loose scan of the two partial
-- indexes (one probe per distinct name; a queue started onto by name and never declared is listed too).
-- Per queue: its queued and its admitted instances, at most $2 index entries read each (a count that
-- costs the same on a million as on a thousand, "at least $2" beyond: the ORDER BY is the index's, as in
-- count_instances_all); the admissions of its rate window after $1 - rate_period; the start of its oldest
-- queued instance: the line is in (priority, queued_at) order, so the first entry of each priority is its
-- oldest; a loose scan of the first $4 priorities (one probe each) finds them.
WITH RECURSIVE waiting(name) AS (
    SELECT (SELECT min(queue) FROM {schema}.geste_instances
            WHERE queued_at IS NOT NULL AND status = 'pending')
    UNION ALL
    SELECT (SELECT min(i.queue) FROM {schema}.geste_instances i
            WHERE i.queued_at IS NOT NULL AND i.status = 'pending' AND i.queue > w.name)
    FROM waiting w WHERE w.name IS NOT NULL
), busy(name) AS (
    SELECT (SELECT min(queue) FROM {schema}.geste_instances
            WHERE queue IS NOT NULL AND queued_at IS NULL
              AND status IN ('pending', 'running', 'waiting', 'compensating'))
    UNION ALL
    SELECT (SELECT min(i.queue) FROM {schema}.geste_instances i
            WHERE i.queue IS NOT NULL AND i.queued_at IS NULL
              AND i.status IN ('pending', 'running', 'waiting', 'compensating') AND i.queue > b.name)
    FROM busy b WHERE b.name IS NOT NULL
), names(name) AS (
    (SELECT name FROM {schema}.geste_queues ORDER BY name LIMIT $3)
    UNION
    (SELECT name FROM waiting WHERE name IS NOT NULL LIMIT $3)
    UNION
    (SELECT name FROM busy WHERE name IS NOT NULL LIMIT $3)
)
SELECT n.name, q.name IS NOT NULL AS declared, q.concurrency, q.worker_concurrency, q.rate_limit,
       q.rate_period,
       (SELECT count(*) FROM (
            SELECT 1 FROM {schema}.geste_instances i
            WHERE i.queue = n.name AND i.queued_at IS NOT NULL AND i.status = 'pending'
            ORDER BY i.queue, i.priority, i.queued_at
            LIMIT $2) AS c) AS queued,
       (SELECT count(*) FROM (
            SELECT 1 FROM {schema}.geste_instances i
            WHERE i.queue = n.name AND i.queued_at IS NULL
              AND i.status IN ('pending', 'running', 'waiting', 'compensating')
            ORDER BY i.queue, i.partition_key  -- the index's order: an index-only scan, not a bitmap
            LIMIT $2) AS c) AS admitted,
       (SELECT count(*) FROM unnest(q.starts) AS s WHERE s > $1 - q.rate_period) AS rate_used,
       (WITH RECURSIVE levels(priority, oldest) AS (
            (SELECT i.priority, i.queued_at FROM {schema}.geste_instances i
             WHERE i.queue = n.name AND i.queued_at IS NOT NULL AND i.status = 'pending'
             ORDER BY i.queue, i.priority, i.queued_at LIMIT 1)
            UNION ALL
            SELECT x.priority, x.queued_at FROM levels l CROSS JOIN LATERAL (
                SELECT i.priority, i.queued_at FROM {schema}.geste_instances i
                WHERE i.queue = n.name AND i.priority > l.priority
                  AND i.queued_at IS NOT NULL AND i.status = 'pending'
                ORDER BY i.queue, i.priority, i.queued_at LIMIT 1) AS x
        )
        SELECT min(oldest) FROM (SELECT oldest FROM levels LIMIT $4) AS y) AS oldest_queued_at
FROM names n LEFT JOIN {schema}.geste_queues q ON q.name = n.name
ORDER BY n.name
LIMIT $3;

-- Published state (schema 25; docs/state.md, docs/design.md "Published state").

-- name: state_set
-- ctx.set_state in one statement: the step commit of `record` (prove and renew the lease, append the
-- rows) plus the key's next version ($12 key, $13 the value's JSON, $14 the run, $15 the step's seq): one
-- backward probe of the primary key for the last version. Versions of one instance never race: the
-- journal sends one set_state of a run at a time, and only the lease holder writes. A
-- geste_workflow_resumable with a "state" field ($16: notifications on) only when a wait_state call of
-- another process than the writer's is registered for the key (a probe of geste_result_waiters by the
-- instance's prefix): none, the common case, and the commit takes no notify lock.
WITH lease AS (
    UPDATE {schema}.geste_instances
    SET lock_expires_at = $3, updated_at = $4, steps = steps + cardinality($5::integer[]),
        status = COALESCE($11, status)
    WHERE instance_id = $1 AND lease_id = $2
    RETURNING cancel_requested, locked_by
), rows AS (
    INSERT INTO {schema}.geste_history (instance_id, seq, kind, name, payload, is_error, created_at)
    SELECT $1, r.* FROM unnest($5::integer[], $6::text[], $7::text[], $8::text[], $9::boolean[],
                               $10::double precision[]) AS r
    WHERE EXISTS (SELECT 1 FROM lease)
), state AS (
    INSERT INTO {schema}.geste_state (instance_id, key, version, value, run, seq, created_at)
    SELECT $1, $12,
           COALESCE((SELECT version FROM {schema}.geste_state
                     WHERE instance_id = $1 AND key = $12 ORDER BY version DESC LIMIT 1), 0) + 1,
           $13, $14, $15, $4
    WHERE EXISTS (SELECT 1 FROM lease)
    RETURNING version
), notified AS (
    SELECT pg_notify('geste_workflow_resumable',
                     json_build_object('instance_id', $1::text, 'state', $12::text, 'version', version,
                                       'schema', {schema_name})::text)
    FROM state
    WHERE $16 AND EXISTS (SELECT 1 FROM {schema}.geste_result_waiters w
                          WHERE w.instance_id = $1 AND w.state_key = $12
                            AND w.process IS DISTINCT FROM (SELECT locked_by FROM lease))
)
SELECT cancel_requested, (SELECT version FROM state) AS version, (SELECT count(*) FROM notified) AS notified
FROM lease;

-- name: get_state
-- handle.get_state / wait_state: the instance's status and the latest value of key $2 (or version $3), by
-- primary keys; no row when the instance does not exist.
SELECT i.status, s.key, s.version, s.value, s.run, s.seq, s.created_at
FROM {schema}.geste_instances i
LEFT JOIN LATERAL (
    SELECT key, version, value, run, seq, created_at FROM {schema}.geste_state
    WHERE instance_id = i.instance_id AND key = $2 AND ($3::integer IS NULL OR version = $3)
    ORDER BY version DESC LIMIT 1
) s ON true
WHERE i.instance_id = $1;

-- name: list_state
-- The latest value of each of the instance's keys, at most $2 keys by key: the viewer's and the HTTP
-- API's. Reads every value of the instance (the primary key's prefix).
SELECT DISTINCT ON (key) key, version, value, run, seq, created_at
FROM {schema}.geste_state WHERE instance_id = $1
ORDER BY key, version DESC
LIMIT $2;

-- name: watch_state
-- A wait_state call ($3, its own id; $4 the worker id of its process) waits for values of key $2: its row
-- in geste_result_waiters, as watch_result's (written only while the instance has not ended; renewed, $5
-- the new expiry, when it is there already), with the key it waits for.
INSERT INTO {schema}.geste_result_waiters (instance_id, waiter, process, expires_at, state_key)
SELECT $1, $3, $4, $5, $2
WHERE EXISTS (SELECT 1 FROM {schema}.geste_instances
              WHERE instance_id = $1 AND status NOT IN ('completed', 'failed', 'cancelled'))
ON CONFLICT (instance_id, waiter) DO UPDATE SET expires_at = excluded.expires_at
RETURNING true AS watched;

-- name: stream_write
-- A batch of stream writes (26; docs/design.md "Streams"): $1..$4 one element per item (instance id,
-- stream key, writer, item; a NULL item closes the stream), $5 the time. An item whose writer the stream
-- holds already (a replay's or a retried activity's rewrite) or whose stream is closed is dropped. Each
-- stream's head row is locked by the upsert until the commit, so a stream's positions follow its commits
-- (a later batch's items come after, and commit after); the upserts go in key order, so two batches of two
-- processes lock their common heads in one order (no deadlock). A closed head is not updated, so no row of
-- it is returned and its items are joined away (no probe of the heads per item). A concurrent duplicate
-- (two processes writing one writer) is dropped by ON CONFLICT on the writer index and leaves a gap, which
-- readers skip; positions cannot conflict (the locked head gives them), so the primary key is not an
-- arbiter (no check of it before each insert). The writer probe is one index probe per item (OFFSET 0: a
-- subplan, never a hash of the whole table, which the planner picks while the table is small). Returns the
-- streams written that have a reader registered (geste_stream_readers, by key, probed only when the table
-- has a row at all): the caller notifies those after the commit.
WITH input AS (
    SELECT u.instance_id, u.key, u.writer, u.item, u.ord
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
         WITH ORDINALITY AS u(instance_id, key, writer, item, ord)
), fresh AS (
    SELECT i.* FROM input i
    WHERE NOT EXISTS (SELECT 1 FROM {schema}.geste_streams s
                      WHERE s.instance_id = i.instance_id AND s.key = i.key AND s.writer = i.writer
                      OFFSET 0)
), counts AS (
    SELECT instance_id, key, count(*) AS n, bool_or(item IS NULL) AS closing
    FROM fresh GROUP BY instance_id, key
    ORDER BY instance_id, key
), heads AS (
    INSERT INTO {schema}.geste_stream_heads AS h (instance_id, key, next_position, closed)
    SELECT instance_id, key, n, closing FROM counts
    ON CONFLICT (instance_id, key) DO UPDATE
        SET next_position = h.next_position + excluded.next_position, closed = excluded.closed
        WHERE NOT h.closed
    RETURNING h.instance_id, h.key, h.next_position
), written AS (
    INSERT INTO {schema}.geste_streams (instance_id, key, position, writer, item, written_at)
    SELECT f.instance_id, f.key,
           h.next_position - c.n - 1 + row_number() OVER (PARTITION BY f.instance_id, f.key ORDER BY f.ord),
           f.writer, f.item, $5
    FROM fresh f
    JOIN counts c ON c.instance_id = f.instance_id AND c.key = f.key
    JOIN heads h ON h.instance_id = f.instance_id AND h.key = f.key
    ON CONFLICT (instance_id, key, writer) DO NOTHING
    RETURNING instance_id, key
)
SELECT DISTINCT w.instance_id, w.key FROM written w
WHERE EXISTS (SELECT 1 FROM {schema}.geste_stream_readers)
  AND EXISTS (SELECT 1 FROM {schema}.geste_stream_readers r
              WHERE r.instance_id = w.instance_id AND r.key = w.key);

-- name: stream_read
-- The items of a stream from position $3 on, in order, $4 at most: a range scan of the primary key.
SELECT position, item FROM {schema}.geste_streams
WHERE instance_id = $1 AND key = $2 AND position >= $3
ORDER BY position LIMIT $4;

-- name: stream_instance_status
-- A reader that read everything: has the instance ended (which closes its streams)? Its primary key.
SELECT status FROM {schema}.geste_instances WHERE instance_id = $1;

-- name: stream_list
-- The streams of an instance (the viewer): their heads, by key.
SELECT key, next_position, closed FROM {schema}.geste_stream_heads
WHERE instance_id = $1 ORDER BY key LIMIT $2;

-- name: stream_watch
-- A reader ($3, its own id; $4 the worker id of its process) waits for a stream: its row, renewed ($5 the
-- new expiry) when there already. The caller reads the stream again after this commits: an item that
-- committed before is seen by that read, one after is notified.
INSERT INTO {schema}.geste_stream_readers (instance_id, key, reader, process, expires_at)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (instance_id, key, reader) DO UPDATE SET expires_at = excluded.expires_at;

-- name: stream_unwatch
-- Readers that stopped waiting: their rows, by key.
DELETE FROM {schema}.geste_stream_readers r
USING unnest($1::text[], $2::text[], $3::text[]) AS u(instance_id, key, reader)
WHERE r.instance_id = u.instance_id AND r.key = u.key AND r.reader = u.reader;

-- name: stream_readers_cleanup
-- The cleanup chore: at most $2 rows of readers that stopped renewing them before $1 (they died), oldest
-- first, through geste_stream_readers_by_expiry.
WITH expired AS (
    SELECT instance_id, key, reader FROM {schema}.geste_stream_readers
    WHERE expires_at < $1 ORDER BY expires_at LIMIT $2
), gone AS (
    DELETE FROM {schema}.geste_stream_readers r USING expired e
    WHERE r.instance_id = e.instance_id AND r.key = e.key AND r.reader = e.reader
    RETURNING 1
)
SELECT count(*) FROM gone;

-- name: stream_notify
-- Wake the readers of the streams just written (one payload per element of $1, each naming many streams):
-- its own statement after the writes committed, one for many write batches, so that the write path takes
-- no notify lock at its commits.
SELECT pg_notify('geste_stream_written', p) FROM unnest($1::text[]) AS p;

-- name: patches
-- `geste patches` (schema 27; docs/versioning.md): per workflow and patch id, its markers in the current
-- runs' histories (a scan of geste_history_patches: one entry per marker, joined to its instance by key)
-- with the first one's time, and its old runs: the unfinished instances of the workflow whose current run
-- started before that first marker and whose history lacks it (a range of
-- geste_instances_by_name_status per unfinished status, each instance probed in geste_history_patches).
-- At most $1 patches.
WITH marked AS (
    SELECT i.workflow_name, h.name AS patch_id, min(h.created_at) AS first_at, count(*) AS marked
    FROM {schema}.geste_history AS h JOIN {schema}.geste_instances AS i ON i.instance_id = h.instance_id
    WHERE h.kind = 'patch'
    GROUP BY i.workflow_name, h.name
    ORDER BY i.workflow_name, h.name
    LIMIT $1
)
SELECT m.workflow_name, m.patch_id, m.first_at, m.marked,
       (SELECT count(*) FROM {schema}.geste_instances AS o
        WHERE o.workflow_name = m.workflow_name
          AND o.status IN ('pending', 'running', 'waiting', 'compensating')
          AND o.created_at < m.first_at AND coalesce(o.run_started_at, o.created_at) < m.first_at
          AND NOT EXISTS (SELECT 1 FROM {schema}.geste_history AS x
                          WHERE x.kind = 'patch' AND x.name = m.patch_id AND x.instance_id = o.instance_id)
       ) AS old_runs
FROM marked AS m
ORDER BY m.workflow_name, m.patch_id;

-- name: trace_context
-- The W3C trace context recorded at the instance's start (schema 30; docs/tracing.md): read at the start of
-- a run when tracing is on, never otherwise. One primary-key probe.
SELECT trace_context FROM {schema}.geste_instances WHERE instance_id = $1;
