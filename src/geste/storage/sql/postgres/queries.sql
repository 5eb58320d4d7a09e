-- Every query of the PostgreSQL backend, by name. {schema} is replaced by the configured schema, quoted.
-- Single statements run as their own transaction: one round trip, one commit.
-- NOTIFYs (pg_notify) are sent inside the statement that makes the work claimable, so they reach the
-- listeners only if it commits, and only once the instance can be claimed. A parameter says whether
-- notifications are on (listen_notify); ordinary step commits (record, finish) never notify.

-- name: find_tables
SELECT table_name FROM information_schema.tables
WHERE table_schema = $1 AND table_name LIKE 'geste%';

-- name: get_meta
SELECT value FROM {schema}.geste_meta WHERE key = $1;

-- name: set_meta
INSERT INTO {schema}.geste_meta (key, value) VALUES ($1, $2)
ON CONFLICT (key) DO UPDATE SET value = excluded.value;

-- name: insert_instance
-- Concurrent starts of one id: ON CONFLICT waits for the other insert and then does nothing.
WITH inserted AS (
    INSERT INTO {schema}.geste_instances
        (instance_id, workflow_name, status, input, created_at, updated_at, run_at,
         locked_by, lease_id, lock_expires_at)
    VALUES ($1, $2, $3, $4, $5, $5, $5, $6, $7, $8)
    ON CONFLICT (instance_id) DO NOTHING
    RETURNING instance_id, workflow_name, status, input, result, error, created_at, updated_at, finished_at,
              run_at, locked_by, lock_expires_at, cancel_requested, steps
), notified AS (  -- a new instance nobody holds: a worker elsewhere may take it at once
    SELECT pg_notify('geste_workflow_resumable',
                     json_build_object('instance_id', $1::text, 'workflow_name', $2::text)::text)
    FROM inserted WHERE $9 AND $7::text IS NULL
)
SELECT true AS created, *, (SELECT count(*) FROM notified) FROM inserted
UNION ALL
SELECT false, instance_id, workflow_name, status, input, result, error, created_at, updated_at, finished_at,
       run_at, locked_by, lock_expires_at, cancel_requested, steps, 0
FROM {schema}.geste_instances WHERE instance_id = $1 AND NOT EXISTS (SELECT 1 FROM inserted);

-- name: get_instance
SELECT instance_id, workflow_name, status, input, result, error, created_at, updated_at, finished_at,
       run_at, locked_by, lock_expires_at, cancel_requested, steps
FROM {schema}.geste_instances WHERE instance_id = $1;

-- name: list_instances
SELECT instance_id, workflow_name, status, input, result, error, created_at, updated_at, finished_at,
       run_at, locked_by, lock_expires_at, cancel_requested, steps
FROM {schema}.geste_instances
WHERE ($1::text IS NULL OR workflow_name = $1) AND ($2::text IS NULL OR status = $2)
ORDER BY created_at DESC, instance_id DESC
LIMIT $3 OFFSET $4;

-- name: get_history
SELECT seq, kind, name, payload, is_error, created_at
FROM {schema}.geste_history WHERE instance_id = $1 ORDER BY seq;

-- name: insert_history
INSERT INTO {schema}.geste_history (instance_id, seq, kind, name, payload, is_error, created_at)
SELECT $1, * FROM unnest($2::integer[], $3::text[], $4::text[], $5::text[], $6::boolean[],
                         $7::double precision[]);

-- name: cancel_unstarted
UPDATE {schema}.geste_instances
SET status = 'cancelled', cancel_requested = true, run_at = NULL, finished_at = $2, updated_at = $2
WHERE instance_id = $1 AND status = 'pending' AND lease_id IS NULL;

-- name: flag_cancel
-- A held instance learns of it at its next step commit; a waiting one is woken (and notified).
WITH flagged AS (
    UPDATE {schema}.geste_instances
    SET cancel_requested = true, updated_at = $2,
        run_at = CASE WHEN run_at IS NULL OR run_at > $2 THEN $2 ELSE run_at END
    WHERE instance_id = $1 AND status IN ('pending', 'running', 'waiting', 'compensating')
    RETURNING instance_id, workflow_name, lease_id
)
SELECT count(pg_notify('geste_workflow_resumable',
                       json_build_object('instance_id', instance_id, 'workflow_name', workflow_name)::text))
FROM flagged WHERE $3 AND lease_id IS NULL;

-- name: claim
-- FOR UPDATE SKIP LOCKED: concurrent claimers take disjoint sets without waiting on each other.
WITH picked AS (
    SELECT instance_id FROM {schema}.geste_instances
    WHERE run_at <= $3 AND (lease_id IS NULL OR lock_expires_at <= $3)
    ORDER BY run_at
    LIMIT $5
    FOR UPDATE SKIP LOCKED
)
UPDATE {schema}.geste_instances AS i
SET locked_by = $1,
    lease_id = $2 || i.instance_id,
    lock_expires_at = $4,
    status = CASE WHEN i.status IN ('pending', 'waiting') THEN 'running' ELSE i.status END,
    updated_at = $3
FROM picked
WHERE i.instance_id = picked.instance_id
RETURNING i.instance_id, i.lease_id, i.workflow_name, i.input, i.status, i.created_at, i.cancel_requested;

-- name: renew
UPDATE {schema}.geste_instances AS i SET lock_expires_at = $1
FROM unnest($2::text[], $3::text[]) AS l(instance_id, lease_id)
WHERE i.instance_id = l.instance_id AND i.lease_id = l.lease_id
RETURNING i.instance_id;

-- name: release
-- Leases given back with work left: resumable now (notified after the release commits), or at $1.
WITH released AS (
    UPDATE {schema}.geste_instances AS i
    SET locked_by = NULL, lease_id = NULL, lock_expires_at = NULL, run_at = $1, updated_at = $2
    FROM unnest($3::text[], $4::text[]) AS l(instance_id, lease_id)
    WHERE i.instance_id = l.instance_id AND i.lease_id = l.lease_id
    RETURNING i.instance_id, i.workflow_name
)
SELECT count(CASE WHEN $1 <= $2
                  THEN pg_notify('geste_workflow_resumable',
                                 json_build_object('instance_id', instance_id,
                                                   'workflow_name', workflow_name)::text)
                  ELSE pg_notify('geste_timer_expired',
                                 json_build_object('instance_id', instance_id, 'timer_id', NULL,
                                                   'expires_at', $1)::text)
             END)
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

-- name: lock_event_type
-- Serialises, per event type, "send an event" with "take an event or wait": no lost wake-up.
SELECT pg_advisory_xact_lock(hashtextextended('geste_event:' || $1, 0));

-- name: suspend
-- One statement: mark waiting and release, append the rows, replace the timers and event wait.
-- Refused (no row updated) while a cancellation is pending. Returns (suspended, lease was ours).
WITH suspended AS (
    UPDATE {schema}.geste_instances
    SET status = 'waiting', run_at = $3, locked_by = NULL, lease_id = NULL, lock_expires_at = NULL,
        updated_at = $4, steps = steps + cardinality($5::integer[])
    WHERE instance_id = $1 AND lease_id = $2 AND NOT cancel_requested
    RETURNING instance_id
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
), notified AS (  -- every listener schedules a precise local wake-up at expires_at
    SELECT pg_notify('geste_timer_expired',
                     json_build_object('instance_id', $1::text, 'timer_id', $11::integer,
                                       'expires_at', $12::double precision)::text)
    WHERE $13 AND $11::integer IS NOT NULL AND EXISTS (SELECT 1 FROM suspended)
)
SELECT EXISTS (SELECT 1 FROM suspended),
       COALESCE((SELECT lease_id = $2 FROM {schema}.geste_instances WHERE instance_id = $1), false),
       (SELECT count(*) FROM notified);

-- name: touch_lease
UPDATE {schema}.geste_instances
SET lock_expires_at = $3, updated_at = $4, steps = steps + $5
WHERE instance_id = $1 AND lease_id = $2
RETURNING cancel_requested;

-- name: finish
-- One statement: store the outcome and release, append the last rows, forget timers and waits.
WITH done AS (
    UPDATE {schema}.geste_instances
    SET status = $3, result = $4, error = $5, finished_at = $6, updated_at = $6,
        run_at = NULL, locked_by = NULL, lease_id = NULL, lock_expires_at = NULL,
        steps = steps + cardinality($7::integer[])
    WHERE instance_id = $1 AND lease_id = $2
    RETURNING instance_id
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
SELECT count(*) FROM done;

-- name: insert_event_wait
INSERT INTO {schema}.geste_event_waits (instance_id, event_type, match, since, deadline)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (instance_id) DO UPDATE SET
    event_type = excluded.event_type, match = excluded.match, since = excluded.since,
    deadline = excluded.deadline;

-- name: candidate_events
SELECT e.seq, e.event_id, e.event_type, e.data, e.source, e.extensions, e.created_at
FROM {schema}.geste_events e
WHERE e.event_type = $1 AND e.created_at >= $2
  AND (e.target_instance_id IS NULL OR e.target_instance_id = $3)
  AND NOT EXISTS (SELECT 1 FROM {schema}.geste_event_deliveries d
                  WHERE d.instance_id = $3 AND d.event_seq = e.seq)
ORDER BY e.seq;

-- name: insert_delivery
INSERT INTO {schema}.geste_event_deliveries (instance_id, event_seq) VALUES ($1, $2);

-- name: insert_event
INSERT INTO {schema}.geste_events (event_id, event_type, source, data, extensions, target_instance_id, created_at)
VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT (event_id) DO NOTHING
RETURNING seq;

-- name: waits_for_event
SELECT instance_id, match FROM {schema}.geste_event_waits
WHERE event_type = $1 AND ($2::text IS NULL OR instance_id = $2);

-- name: wake
-- Instances an event was delivered to: runnable now; the unlocked ones are notified.
WITH woken AS (
    UPDATE {schema}.geste_instances SET run_at = $2, updated_at = $2
    WHERE instance_id = ANY($1::text[]) AND status IN ('waiting', 'running')
      AND (run_at IS NULL OR run_at > $2)
    RETURNING instance_id, workflow_name, lease_id
)
SELECT instance_id,
       CASE WHEN $3 AND lease_id IS NULL
            THEN pg_notify('geste_workflow_resumable',
                           json_build_object('instance_id', instance_id, 'workflow_name', workflow_name)::text)
       END
FROM woken;

-- name: next_run_at
SELECT min(run_at) FROM {schema}.geste_instances WHERE run_at IS NOT NULL AND lease_id IS NULL;

-- name: upsert_worker
-- Registration and every heartbeat: one statement (a HOT update: no index covers what it changes). A
-- worker id seen again (a restart) starts afresh.
INSERT INTO {schema}.geste_workers
    (worker_id, host, pid, started_at, heartbeat_at, running, concurrency, listener, stopped_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, NULL)
ON CONFLICT (worker_id) DO UPDATE SET
    host = excluded.host, pid = excluded.pid, started_at = excluded.started_at,
    heartbeat_at = excluded.heartbeat_at, running = excluded.running, concurrency = excluded.concurrency,
    listener = excluded.listener, stopped_at = NULL;

-- name: mark_worker_stopped
UPDATE {schema}.geste_workers SET stopped_at = $2, running = 0 WHERE worker_id = $1;

-- name: prune_workers
DELETE FROM {schema}.geste_workers WHERE heartbeat_at < $1;

-- name: list_workers
-- The table holds the workers heard from within a week (pruned at each start): a small scan.
SELECT worker_id, host, pid, started_at, heartbeat_at, running, concurrency, listener, stopped_at
FROM {schema}.geste_workers ORDER BY heartbeat_at DESC, worker_id LIMIT $1;

-- name: count_by_status
-- An index-only scan of geste_instances_by_status (status, created_at) where the visibility map allows.
SELECT status, count(*) FROM {schema}.geste_instances GROUP BY status;

-- name: count_runnable
-- What a claim at $1 could take; through geste_instances_runnable (run_at), so it reads the instances
-- that are runnable or running, never the finished or the waiting ones.
SELECT count(*) FROM {schema}.geste_instances
WHERE run_at <= $1 AND (lease_id IS NULL OR lock_expires_at <= $1);

-- name: held_leases
-- A lease is only ever held by a running or compensating instance (claims and local starts make it
-- running; suspending and finishing release it), so geste_instances_by_status bounds the read.
SELECT locked_by, count(*) FROM {schema}.geste_instances
WHERE status IN ('running', 'compensating') AND lease_id IS NOT NULL AND lock_expires_at > $1
GROUP BY locked_by;

-- name: oldest_waiting
-- Through geste_instances_by_status: reads the waiting instances only (updated_at has no index of its
-- own, which every step commit would have to maintain).
SELECT min(updated_at) FROM {schema}.geste_instances WHERE status = 'waiting';
