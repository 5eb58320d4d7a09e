-- Every query of the SQLite backend, by name. Loaded once by geste.storage.sqlite.

-- name: list_tables
SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%';

-- name: get_meta
SELECT value FROM geste_meta WHERE key = ?;

-- name: set_meta
INSERT INTO geste_meta (key, value) VALUES (?, ?)
ON CONFLICT (key) DO UPDATE SET value = excluded.value;

-- name: insert_instance
INSERT INTO geste_instances
    (instance_id, workflow_name, status, input, created_at, updated_at, run_at,
     locked_by, lease_id, lock_expires_at)
VALUES (:instance_id, :workflow_name, :status, :input, :now, :now, :now,
        :locked_by, :lease_id, :lock_expires_at)
ON CONFLICT (instance_id) DO NOTHING;

-- name: get_instance
SELECT instance_id, workflow_name, status, input, result, error, created_at, updated_at, finished_at,
       run_at, locked_by, lock_expires_at, cancel_requested, steps
FROM geste_instances WHERE instance_id = ?;

-- name: list_instances
SELECT instance_id, workflow_name, status, input, result, error, created_at, updated_at, finished_at,
       run_at, locked_by, lock_expires_at, cancel_requested, steps
FROM geste_instances
WHERE (:workflow_name IS NULL OR workflow_name = :workflow_name)
  AND (:status IS NULL OR status = :status)
ORDER BY created_at DESC, instance_id DESC
LIMIT :limit OFFSET :offset;

-- name: get_history
SELECT seq, kind, name, payload, is_error, created_at
FROM geste_history WHERE instance_id = ? ORDER BY seq;

-- name: insert_history
INSERT INTO geste_history (instance_id, seq, kind, name, payload, is_error, created_at)
VALUES (?, ?, ?, ?, ?, ?, ?);

-- name: cancel_unstarted
UPDATE geste_instances
SET status = 'cancelled', cancel_requested = 1, run_at = NULL, finished_at = :now, updated_at = :now
WHERE instance_id = :instance_id AND status = 'pending' AND lease_id IS NULL;

-- name: flag_cancel
UPDATE geste_instances
SET cancel_requested = 1, updated_at = :now,
    run_at = CASE WHEN run_at IS NULL OR run_at > :now THEN :now ELSE run_at END
WHERE instance_id = :instance_id AND status IN ('pending', 'running', 'waiting', 'compensating');

-- name: claim
-- One statement: pick the runnable instances whose lease is free or expired and take them.
UPDATE geste_instances
SET locked_by = :worker_id,
    lease_id = :lease_prefix || instance_id,
    lock_expires_at = :lock_expires_at,
    status = CASE WHEN status IN ('pending', 'waiting') THEN 'running' ELSE status END,
    updated_at = :now
WHERE instance_id IN (
    SELECT instance_id FROM geste_instances
    WHERE run_at <= :now AND (lease_id IS NULL OR lock_expires_at <= :now)
    ORDER BY run_at
    LIMIT :limit
)
RETURNING instance_id, lease_id, workflow_name, input, status, created_at, cancel_requested;

-- name: renew
UPDATE geste_instances SET lock_expires_at = ? WHERE instance_id = ? AND lease_id = ?;

-- name: release
UPDATE geste_instances
SET locked_by = NULL, lease_id = NULL, lock_expires_at = NULL, run_at = ?, updated_at = ?
WHERE instance_id = ? AND lease_id = ?;

-- name: touch_lease
-- Every write under a lease starts here: it proves the lease is still ours and renews it.
UPDATE geste_instances
SET lock_expires_at = :lock_expires_at, updated_at = :now, steps = steps + :steps,
    status = COALESCE(:status, status)
WHERE instance_id = :instance_id AND lease_id = :lease_id
RETURNING cancel_requested;

-- name: suspend
UPDATE geste_instances
SET status = 'waiting', run_at = :run_at, locked_by = NULL, lease_id = NULL, lock_expires_at = NULL,
    updated_at = :now, steps = steps + :steps
WHERE instance_id = :instance_id AND lease_id = :lease_id AND cancel_requested = 0;

-- name: lease_state
SELECT lease_id = :lease_id, cancel_requested FROM geste_instances WHERE instance_id = :instance_id;

-- name: finish
UPDATE geste_instances
SET status = :status, result = :result, error = :error, finished_at = :now, updated_at = :now,
    run_at = NULL, locked_by = NULL, lease_id = NULL, lock_expires_at = NULL, steps = steps + :steps
WHERE instance_id = :instance_id AND lease_id = :lease_id;

-- name: clear_timers
DELETE FROM geste_timers WHERE instance_id = ?;

-- name: clear_event_wait
DELETE FROM geste_event_waits WHERE instance_id = ?;

-- name: insert_timer
INSERT INTO geste_timers (instance_id, seq, expires_at) VALUES (?, ?, ?);

-- name: insert_event_wait
INSERT INTO geste_event_waits (instance_id, event_type, match, since, deadline) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (instance_id) DO UPDATE SET
    event_type = excluded.event_type, match = excluded.match, since = excluded.since,
    deadline = excluded.deadline;

-- name: candidate_events
SELECT e.seq, e.event_id, e.event_type, e.data, e.source, e.extensions, e.created_at
FROM geste_events e
WHERE e.event_type = :event_type AND e.created_at >= :since
  AND (e.target_instance_id IS NULL OR e.target_instance_id = :instance_id)
  AND NOT EXISTS (SELECT 1 FROM geste_event_deliveries d
                  WHERE d.instance_id = :instance_id AND d.event_seq = e.seq)
ORDER BY e.seq;

-- name: insert_delivery
INSERT INTO geste_event_deliveries (instance_id, event_seq) VALUES (?, ?);

-- name: insert_event
INSERT INTO geste_events (event_id, event_type, source, data, extensions, target_instance_id, created_at)
VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (event_id) DO NOTHING;

-- name: waits_for_event
SELECT instance_id, match, since FROM geste_event_waits
WHERE event_type = :event_type AND since <= :now
  AND (:target IS NULL OR instance_id = :target);

-- name: wake
UPDATE geste_instances SET run_at = :now, updated_at = :now
WHERE instance_id = :instance_id AND status IN ('waiting', 'running')
  AND (run_at IS NULL OR run_at > :now);

-- name: next_run_at
SELECT MIN(run_at) FROM geste_instances WHERE run_at IS NOT NULL AND lease_id IS NULL;

-- name: upsert_worker
-- Registration and every heartbeat: one statement. A worker id seen again (a restart) starts afresh.
INSERT INTO geste_workers
    (worker_id, host, pid, started_at, heartbeat_at, running, concurrency, listener, stopped_at)
VALUES (:worker_id, :host, :pid, :started_at, :heartbeat_at, :running, :concurrency, :listener, NULL)
ON CONFLICT (worker_id) DO UPDATE SET
    host = excluded.host, pid = excluded.pid, started_at = excluded.started_at,
    heartbeat_at = excluded.heartbeat_at, running = excluded.running, concurrency = excluded.concurrency,
    listener = excluded.listener, stopped_at = NULL;

-- name: mark_worker_stopped
UPDATE geste_workers SET stopped_at = :now, running = 0 WHERE worker_id = :worker_id;

-- name: prune_workers
DELETE FROM geste_workers WHERE heartbeat_at < ?;

-- name: list_workers
-- The table holds the workers heard from within a week (pruned at each start): a small scan.
SELECT worker_id, host, pid, started_at, heartbeat_at, running, concurrency, listener, stopped_at
FROM geste_workers ORDER BY heartbeat_at DESC, worker_id LIMIT ?;

-- name: count_by_status
-- Covered by geste_instances_by_status (status, created_at): no table rows read.
SELECT status, count(*) FROM geste_instances GROUP BY status;

-- name: count_runnable
-- What a claim at :now could take; through geste_instances_runnable (run_at), so it reads the instances
-- that are runnable or running, never the finished or the waiting ones.
SELECT count(*) FROM geste_instances
WHERE run_at <= :now AND (lease_id IS NULL OR lock_expires_at <= :now);

-- name: held_leases
-- A lease is only ever held by a running or compensating instance (claims and local starts make it
-- running; suspending and finishing release it), so geste_instances_by_status bounds the read.
SELECT locked_by, count(*) FROM geste_instances
WHERE status IN ('running', 'compensating') AND lease_id IS NOT NULL AND lock_expires_at > :now
GROUP BY locked_by;

-- name: oldest_waiting
-- Through geste_instances_by_status: reads the waiting instances only (updated_at has no index of its
-- own, which every step commit would have to maintain).
SELECT min(updated_at) FROM geste_instances WHERE status = 'waiting';
