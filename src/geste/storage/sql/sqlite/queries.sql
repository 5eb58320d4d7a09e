-- Every query of the SQLite backend, by name. Loaded once by geste.storage.sqlite.

-- name: list_tables
SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%';

-- name: get_meta
SELECT value FROM geste_meta WHERE key = ?;

-- name: set_meta
INSERT INTO geste_meta (key, value) VALUES (?, ?)
ON CONFLICT (key) DO UPDATE SET value = excluded.value;

-- name: insert_instance
-- Created under a lease (a local start, run at once): its run_at is the lease's expiry, its take-over
-- time, as a claim sets it (schema 11).
INSERT INTO geste_instances
    (instance_id, workflow_name, status, input, created_at, updated_at, run_at,
     locked_by, lease_id, lock_expires_at, event_floor, deadline, version, pinned, trace_context)
VALUES (:instance_id, :workflow_name, :status, :input, :now, :now,
        CASE WHEN :lease_id IS NULL THEN min(:now, {db_clock}) ELSE :lock_expires_at END,
        :locked_by, :lease_id, :lock_expires_at,
        coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'geste_events'), 0), :deadline, :version, :pinned,
        :trace_context)
ON CONFLICT (instance_id) DO NOTHING;

-- name: database_clock
-- The database's own time (Unix seconds): a worker compares its clock with it at start.
SELECT {db_clock} AS now;

-- name: get_instance
SELECT instance_id, workflow_name, status, input, result, error, created_at, updated_at, finished_at,
       run_at, locked_by, lock_expires_at, cancel_requested, steps, run, last_worker, parent_id,
       parent_close, deadline
FROM geste_instances WHERE instance_id = ?;

-- name: list_instances
SELECT instance_id, workflow_name, status, input, result, error, created_at, updated_at, finished_at,
       run_at, locked_by, lock_expires_at, cancel_requested, steps, run, parent_id, deadline
FROM geste_instances
WHERE (:workflow_name IS NULL OR workflow_name = :workflow_name)
  AND (:status IS NULL OR status = :status)
ORDER BY created_at DESC, instance_id DESC
LIMIT :limit OFFSET :offset;

-- name: replay_instances
-- The replay check's read (read_histories): list_instances without the columns added since schema 1, so
-- that a database of an older schema is read too (a copy of production checked before its upgrade). An
-- instance's input and history are those of its current run, whatever its run number.
SELECT instance_id, workflow_name, status, input, result, error, created_at, updated_at, finished_at,
       run_at, locked_by, lock_expires_at, cancel_requested, steps
FROM geste_instances
WHERE (:workflow_name IS NULL OR workflow_name = :workflow_name)
  AND (:status IS NULL OR status = :status)
ORDER BY created_at DESC, instance_id DESC
LIMIT :limit OFFSET :offset;

-- name: get_history
-- The rows after step ? (0: all; a claim of a run the worker keeps in memory reads the rows after it).
SELECT seq, kind, name, payload, is_error, created_at
FROM geste_history WHERE instance_id = ? AND seq > ? ORDER BY seq;

-- name: insert_history
INSERT INTO geste_history (instance_id, seq, kind, name, payload, is_error, created_at)
VALUES (?, ?, ?, ?, ?, ?, ?);

-- name: cancel_unstarted
UPDATE geste_instances
SET status = 'cancelled', cancel_requested = 1, run_at = NULL, finished_at = :now, updated_at = :now
WHERE instance_id = :instance_id AND status = 'pending' AND lease_id IS NULL;

-- name: flag_cancel
-- Runnable "now" is the earlier of the caller's clock and the database's ({db_clock}): a caller whose
-- clock runs ahead of the workers' must not make them wait. A held instance's run_at (its take-over
-- time, schema 11) is left as it is: its holder goes on, or its lease runs out.
UPDATE geste_instances
SET cancel_requested = 1, updated_at = :now,
    run_at = CASE WHEN lease_id IS NULL AND (run_at IS NULL OR run_at > min(:now, {db_clock}))
                  THEN min(:now, {db_clock}) ELSE run_at END
WHERE instance_id = :instance_id AND status IN ('pending', 'running', 'waiting', 'compensating');

-- Operator actions (app.retry, app.resume): each in one BEGIN IMMEDIATE transaction with a read of
-- the instance first, so two operators acting at once are serialised and the second sees the first's work.

-- name: retry_archive
-- A retry (app.retry) keeps what it removes: the rows from :from_seq on (base.retry_cut says which step
-- runs again, from the history read in the same transaction) and the error it clears.
INSERT INTO geste_retries (instance_id, retry, retried_at, from_seq, error, failed_at, removed)
SELECT instance_id,
       (SELECT COALESCE(MAX(retry), 0) + 1 FROM geste_retries WHERE instance_id = :instance_id),
       :now, :from_seq, error, finished_at, :removed
FROM geste_instances WHERE instance_id = :instance_id
RETURNING retry;

-- name: retry_delete_row
DELETE FROM geste_history WHERE instance_id = ? AND seq = ?;

-- name: retry_reopen
-- Runnable now, held by nobody, status 'waiting' (not 'pending': a cancel would end a pending instance
-- at once, without running the compensations its replayed steps register).
UPDATE geste_instances
SET status = 'waiting', result = NULL, error = NULL, finished_at = NULL, run_at = min(:now, {db_clock}),
    updated_at = :now,
    steps = steps - :removed
WHERE instance_id = :instance_id AND status = 'failed';

-- name: last_retry
SELECT retry, retried_at FROM geste_retries WHERE instance_id = ? ORDER BY retry DESC LIMIT 1;

-- name: list_retries
SELECT instance_id, retry, retried_at, from_seq, error, failed_at, removed
FROM geste_retries WHERE instance_id = ? ORDER BY retry;

-- name: worker_liveness
SELECT heartbeat_at, stopped_at, lock_timeout FROM geste_workers WHERE worker_id = ?;

-- name: resume
-- Runnable now (an earlier run_at is kept); with :break the lease goes too: its holder's next write
-- names a lease_id that is gone, so it stops without writing (LeaseLost). A queued instance (schema 20)
-- stays queued: only its queue's claim admits it.
UPDATE geste_instances
SET locked_by = CASE WHEN :break THEN NULL ELSE locked_by END,
    lease_id = CASE WHEN :break THEN NULL ELSE lease_id END,
    lock_expires_at = CASE WHEN :break THEN NULL ELSE lock_expires_at END,
    run_at = CASE WHEN queued_at IS NOT NULL THEN run_at
                  WHEN :break OR run_at IS NULL OR run_at > min(:now, {db_clock}) THEN min(:now, {db_clock})
                  ELSE run_at END,
    updated_at = :now
WHERE instance_id = :instance_id;

-- name: claim_pick
-- The runnable instances of one workflow the worker registers (:name, a status this version knows): the
-- heads of its two ranges (schema 11), the leases that ran out (geste_instances_leased_by_name, up to
-- run_at <= :now: a held instance's run_at is its take-over time, so live leases are past the range and
-- never read), with when each ran out (a take-over), and the free instances due
-- (geste_instances_runnable_by_name, which holds no held row), at most :limit of each. The storage's
-- claim merges the heads of its names and takes the earliest (claim_picked), in the same transaction.
SELECT * FROM (
    SELECT instance_id, lock_expires_at AS expired_at, run_at FROM geste_instances
    WHERE coalesce(runner, workflow_name) = :name AND lease_id IS NOT NULL AND run_at <= :now AND lock_expires_at <= :now
      AND status IN ('pending', 'running', 'waiting', 'compensating')
    ORDER BY run_at LIMIT :limit)
UNION ALL
SELECT * FROM (
    SELECT instance_id, NULL AS expired_at, run_at FROM geste_instances
    WHERE coalesce(runner, workflow_name) = :name AND lease_id IS NULL AND run_at <= :due
      AND status IN ('pending', 'running', 'waiting', 'compensating')
    ORDER BY run_at LIMIT :limit);

-- name: claim_picked
-- The instances claim_pick chose (:ids, a JSON array), taken under a new lease; run_at becomes the lease's
-- expiry, the take-over time. PostgreSQL's `claim` and `claim_names` pick and take in one statement.
UPDATE geste_instances
SET locked_by = :worker_id,
    lease_id = :lease_prefix || instance_id,
    lock_expires_at = :lock_expires_at,
    run_at = :lock_expires_at,
    status = CASE WHEN status IN ('pending', 'waiting') THEN 'running' ELSE status END,
    updated_at = :now
WHERE instance_id IN (SELECT value FROM json_each(:ids))
RETURNING instance_id, lease_id, workflow_name, input, status, created_at, cancel_requested, run, deadline,
          runner;

-- name: claim_ids_pick
-- The instances named (:ids, a JSON array) that claim_pick would take, by primary key (schema 13): what a
-- worker's local timer names. claim_picked then takes them; claim_ids_later gives the run_at of those
-- named that are not due yet.
SELECT instance_id, CASE WHEN lease_id IS NOT NULL THEN lock_expires_at END AS expired_at, run_at
FROM geste_instances
WHERE instance_id IN (SELECT value FROM json_each(:ids)) AND coalesce(runner, workflow_name) IN (SELECT value FROM json_each(:names))
  AND ((lease_id IS NULL AND run_at <= :due) OR (lease_id IS NOT NULL AND lock_expires_at <= :now))
  AND status IN ('pending', 'running', 'waiting', 'compensating')
ORDER BY run_at
LIMIT :limit;

-- name: claim_ids_later
SELECT instance_id, run_at FROM geste_instances
WHERE instance_id IN (SELECT value FROM json_each(:ids)) AND coalesce(runner, workflow_name) IN (SELECT value FROM json_each(:names))
  AND run_at > :due AND lease_id IS NULL AND status IN ('pending', 'running', 'waiting', 'compensating');

-- name: renew
-- A held instance's take-over time (run_at) moves to the new expiry when it is before :threshold (half a
-- lease ahead, _decisions.takeover_threshold): past the claims' range while the worker lives. It returns
-- whether a cancel is requested (schema 17): how the holder learns of it while an activity runs.
-- :heartbeats (schema 18): the instance's activity heartbeat details (a JSON object) when new ones were
-- given since the last renewal, else NULL (the column is kept).
UPDATE geste_instances
SET lock_expires_at = :lock_expires_at,
    run_at = CASE WHEN run_at IS NULL OR run_at < :threshold THEN :lock_expires_at ELSE run_at END,
    heartbeats = COALESCE(:heartbeats, heartbeats)
WHERE instance_id = :instance_id AND lease_id = :lease_id
RETURNING cancel_requested;

-- name: heartbeats
-- The heartbeat details recorded for an instance's running activities (schema 18), by primary key.
SELECT heartbeats FROM geste_instances WHERE instance_id = ?;

-- name: release
-- The releaser becomes the instance's last worker (schema 13), as a suspension makes it.
UPDATE geste_instances
SET locked_by = NULL, lease_id = NULL, lock_expires_at = NULL, run_at = ?, updated_at = ?,
    last_worker = locked_by
WHERE instance_id = ? AND lease_id = ?;

-- name: touch_lease
-- Every write under a lease starts here: it proves the lease is still ours and renews it.
UPDATE geste_instances
SET lock_expires_at = :lock_expires_at, updated_at = :now, steps = steps + :steps,
    status = COALESCE(:status, status)
WHERE instance_id = :instance_id AND lease_id = :lease_id
RETURNING cancel_requested;

-- name: suspend
-- The suspending worker becomes the instance's last_worker (schema 13; SET reads the old row). Its run_at
-- is the earlier of the suspension's and the instance's deadline (schema 17): due when the deadline passes.
-- awaits (schema 21): the child this suspension waits for (NULL for any other wait).
UPDATE geste_instances
SET status = 'waiting',
    run_at = CASE WHEN deadline IS NOT NULL AND (:run_at IS NULL OR deadline < :run_at)
                  THEN deadline ELSE :run_at END,
    locked_by = NULL, lease_id = NULL, lock_expires_at = NULL,
    updated_at = :now, steps = steps + :steps, last_worker = locked_by, awaits = :awaits
WHERE instance_id = :instance_id AND lease_id = :lease_id AND cancel_requested = 0;

-- name: lease_state
SELECT lease_id = :lease_id AS ours, cancel_requested FROM geste_instances WHERE instance_id = :instance_id;

-- name: finish
-- The ending worker becomes the last worker, as on PostgreSQL (where it tells which result() waiters the
-- end must notify: those of other processes; schema 14).
UPDATE geste_instances
SET status = :status, result = :result, error = :error, finished_at = :now, updated_at = :now,
    run_at = NULL, locked_by = NULL, lease_id = NULL, lock_expires_at = NULL, steps = steps + :steps,
    last_worker = locked_by
WHERE instance_id = :instance_id AND lease_id = :lease_id;

-- Continue-as-new (schema 15): the storage's continue_as_new, in one BEGIN IMMEDIATE transaction after
-- lease_state found the lease ours and no cancel pending: continue_archive_run (the summary, from the row
-- as the run leaves it), insert_history (the run's last rows, its continue_as_new among them),
-- continue_archive_history and continue_clear_history (its rows move), continue_reopen, clear_timers,
-- clear_event_wait, continue_stop_listening, continue_outbox. Each reads by key: O(rows of the run).

-- name: continue_archive_run
-- Before the run's last rows are inserted: its rows in geste_history plus those (:added).
INSERT INTO geste_runs (instance_id, run, input, started_at, ended_at, steps, ended_as)
SELECT instance_id, run, input, coalesce(run_started_at, created_at), :now,
       (SELECT count(*) FROM geste_history WHERE instance_id = :instance_id) + :added, 'continued'
FROM geste_instances WHERE instance_id = :instance_id AND lease_id = :lease_id;

-- name: continue_archive_history
INSERT INTO geste_run_history (instance_id, run, seq, kind, name, payload, is_error, created_at)
SELECT h.instance_id, i.run, h.seq, h.kind, h.name, h.payload, h.is_error, h.created_at
FROM geste_history h JOIN geste_instances i ON i.instance_id = h.instance_id
WHERE h.instance_id = :instance_id;

-- name: continue_clear_history
DELETE FROM geste_history WHERE instance_id = :instance_id;

-- name: continue_reopen
-- The next run: its input, its number, an empty history; released and runnable now (pending: a cancel
-- before it is claimed ends it at once, as nothing of it ran). The worker that continued keeps a local
-- wake-up for it and becomes its last_worker; another finds it by polling.
UPDATE geste_instances
SET run = run + 1, input = :input, run_started_at = :now, steps = 0, status = 'pending',
    run_at = min(:now, {db_clock}), locked_by = NULL, lease_id = NULL, lock_expires_at = NULL,
    updated_at = :now, last_worker = locked_by
WHERE instance_id = :instance_id AND lease_id = :lease_id AND cancel_requested = 0;

-- name: continue_stop_listening
-- Subscriptions carry over with their cursors (the messages not taken yet are the next run's); none waits.
UPDATE geste_channel_subscriptions SET waiting_since = NULL
WHERE instance_id = :instance_id AND waiting_since IS NOT NULL;

-- name: continue_outbox
-- The run's events not sent yet (pending or dead, through their partial indexes) go below the next run's
-- steps: step_seq minus the run's last step (:last_seq). They keep their order, and the relay still sends
-- an instance's events in order, these before the next run's.
UPDATE geste_outbox SET step_seq = step_seq - :last_seq
WHERE event_id IN (SELECT event_id FROM geste_outbox WHERE instance_id = :instance_id AND status = 'pending'
                   UNION ALL
                   SELECT event_id FROM geste_outbox WHERE instance_id = :instance_id AND status = 'dead');

-- name: list_runs
SELECT instance_id, run, input, started_at, ended_at, steps, ended_as
FROM geste_runs WHERE instance_id = ? ORDER BY run;

-- name: get_run_history
SELECT seq, kind, name, payload, is_error, created_at
FROM geste_run_history WHERE instance_id = ? AND run = ? ORDER BY seq;

-- name: clear_timers
DELETE FROM geste_timers WHERE instance_id = ?;

-- name: clear_event_wait
DELETE FROM geste_event_waits WHERE instance_id = ?;

-- name: insert_timer
INSERT INTO geste_timers (instance_id, seq, expires_at) VALUES (?, ?, ?);

-- name: insert_event_wait
-- The wait keeps the instance's event floor: send_event delivers only an event above it. since: when the
-- wait was registered (shown to operators). match_key (?7): the key it is found by (12).
INSERT INTO geste_event_waits (instance_id, event_type, match, since, deadline, outcome_seq, after_seq, match_key)
VALUES (?1, ?2, ?3, ?4, ?5, ?6,
        (SELECT coalesce(event_floor, 0) FROM geste_instances WHERE instance_id = ?1), ?7)
ON CONFLICT (instance_id) DO UPDATE SET
    event_type = excluded.event_type, match = excluded.match, since = excluded.since,
    deadline = excluded.deadline, outcome_seq = excluded.outcome_seq, after_seq = excluded.after_seq,
    match_key = excluded.match_key;

-- name: candidate_events
-- For a wait without a match: the first event of the type above the instance's event floor
-- (geste_events_by_type: (event_type, seq)) not yet delivered to it.
SELECT e.seq, e.event_id, e.event_type, e.data, e.source, e.extensions, e.created_at
FROM geste_events e
WHERE e.event_type = :event_type
  AND e.seq > (SELECT coalesce(event_floor, 0) FROM geste_instances WHERE instance_id = :instance_id)
  AND (e.target_instance_id IS NULL OR e.target_instance_id = :instance_id)
  AND NOT EXISTS (SELECT 1 FROM geste_event_deliveries d
                  WHERE d.instance_id = :instance_id AND d.event_seq = e.seq)
ORDER BY e.seq
LIMIT 1;

-- name: candidate_events_by_key
-- For a wait with a match: the events above the instance's event floor that have the pair the wait is
-- indexed by (:match_key: geste_event_keys' (match_key, event_seq) range), not yet delivered to it,
-- oldest first; and those stored without keys (before schema 12, or by an older geste: the partial index
-- geste_events_unkeyed, empty once they are gone). The caller compares the whole match.
SELECT e.seq, e.event_id, e.event_type, e.data, e.source, e.extensions, e.created_at
FROM geste_event_keys k JOIN geste_events e ON e.seq = k.event_seq
WHERE k.match_key = :match_key
  AND k.event_seq > (SELECT coalesce(event_floor, 0) FROM geste_instances WHERE instance_id = :instance_id)
  AND e.event_type = :event_type
  AND (e.target_instance_id IS NULL OR e.target_instance_id = :instance_id)
  AND NOT EXISTS (SELECT 1 FROM geste_event_deliveries d
                  WHERE d.instance_id = :instance_id AND d.event_seq = e.seq)
UNION ALL
SELECT e.seq, e.event_id, e.event_type, e.data, e.source, e.extensions, e.created_at
FROM geste_events e
WHERE e.keyed = 0 AND e.event_type = :event_type
  AND e.seq > (SELECT coalesce(event_floor, 0) FROM geste_instances WHERE instance_id = :instance_id)
  AND (e.target_instance_id IS NULL OR e.target_instance_id = :instance_id)
  AND NOT EXISTS (SELECT 1 FROM geste_event_deliveries d
                  WHERE d.instance_id = :instance_id AND d.event_seq = e.seq)
ORDER BY 1;

-- name: unkeyed_waits
-- Migration 12's part in Python: the waits registered before it (geste_event_waits_unkeyed).
SELECT instance_id, event_type, match FROM geste_event_waits WHERE match_key IS NULL;

-- name: key_wait
UPDATE geste_event_waits SET match_key = ?2 WHERE instance_id = ?1 AND match_key IS NULL;

-- name: insert_delivery
INSERT INTO geste_event_deliveries (instance_id, event_seq) VALUES (?, ?);

-- name: insert_event
INSERT INTO geste_events
    (event_id, event_type, source, data, extensions, target_instance_id, created_at, keyed)
VALUES (?, ?, ?, ?, ?, ?, ?, 1)
ON CONFLICT (event_id) DO NOTHING;

-- name: insert_event_keys
-- The event's rows in geste_event_keys: one per top-level pair (:keys, a JSON array of match keys).
INSERT INTO geste_event_keys (match_key, event_seq) SELECT value, :seq FROM json_each(:keys);

-- name: waits_for_event
-- The waits an event (:seq) is visible to (their instance's floor is below it) that may accept it: by
-- its keys (:keys, a JSON array: the type's, for the waits without a match, and its pairs'), and the
-- waits of an older geste by type (no key: geste_event_waits_unkeyed). The caller compares the match.
SELECT instance_id, match, outcome_seq FROM geste_event_waits
WHERE match_key IN (SELECT value FROM json_each(:keys)) AND event_type = :event_type
  AND coalesce(after_seq, 0) < :seq
UNION ALL
SELECT instance_id, match, outcome_seq FROM geste_event_waits
WHERE match_key IS NULL AND event_type = :event_type AND coalesce(after_seq, 0) < :seq;

-- name: waits_for_event_target
-- The wait of the instance an event is sent to (:target), if the event (:seq) is visible to it.
SELECT instance_id, match, outcome_seq FROM geste_event_waits
WHERE instance_id = :target AND event_type = :event_type AND coalesce(after_seq, 0) < :seq;

-- name: deliver_event
-- An event handed straight to an instance that waits for it and that nobody holds: the outcome row is
-- written here, so the woken run only replays (no event-taking transaction of its own).
UPDATE geste_instances SET run_at = min(:now, {db_clock}), updated_at = :now, steps = steps + 1
WHERE instance_id = :instance_id AND status = 'waiting' AND lease_id IS NULL
RETURNING workflow_name;

-- name: wake
-- A held instance is left as it is (it takes the event itself); its run_at is its take-over time.
UPDATE geste_instances SET run_at = min(:now, {db_clock}), updated_at = :now
WHERE instance_id = :instance_id AND status IN ('waiting', 'running') AND lease_id IS NULL
  AND (run_at IS NULL OR run_at > min(:now, {db_clock}));

-- name: next_run_after
-- After a claim that took less than it asked for, in its transaction: how long the worker may sleep.
-- One probe of geste_instances_runnable_by_name per registered workflow (:name).
SELECT MIN(run_at) AS run_at FROM geste_instances
WHERE coalesce(runner, workflow_name) = :name AND run_at > :due AND lease_id IS NULL
  AND status IN ('pending', 'running', 'waiting', 'compensating');

-- name: next_run_at
-- One probe of geste_instances_runnable_by_name (free instances only, schema 11) per distinct workflow
-- name with a free instance that has a run_at (a loose scan of the same index).
WITH RECURSIVE names(name) AS (
    SELECT min(coalesce(runner, workflow_name)) FROM geste_instances
    WHERE run_at IS NOT NULL AND lease_id IS NULL
      AND status IN ('pending', 'running', 'waiting', 'compensating')
    UNION ALL
    SELECT (SELECT min(coalesce(i.runner, i.workflow_name)) FROM geste_instances i
            WHERE i.run_at IS NOT NULL AND i.lease_id IS NULL AND coalesce(i.runner, i.workflow_name) > n.name
              AND i.status IN ('pending', 'running', 'waiting', 'compensating'))
    FROM names n WHERE n.name IS NOT NULL
)
SELECT min((SELECT min(i.run_at) FROM geste_instances i
            WHERE coalesce(i.runner, i.workflow_name) = n.name AND i.run_at IS NOT NULL AND i.lease_id IS NULL
              AND i.status IN ('pending', 'running', 'waiting', 'compensating'))) AS run_at
FROM names n WHERE n.name IS NOT NULL;

-- name: upsert_worker
-- Registration and every heartbeat: one statement. A worker id seen again (a restart) starts afresh.
INSERT INTO geste_workers
    (worker_id, host, pid, started_at, heartbeat_at, running, concurrency, listener, stopped_at, lock_timeout,
     workflows, health, relay, version, queues)
VALUES (:worker_id, :host, :pid, :started_at, :heartbeat_at, :running, :concurrency, :listener, NULL,
        :lock_timeout, :workflows, :health, :relay, :version, :queues)
ON CONFLICT (worker_id) DO UPDATE SET
    host = excluded.host, pid = excluded.pid, started_at = excluded.started_at,
    heartbeat_at = excluded.heartbeat_at, running = excluded.running, concurrency = excluded.concurrency,
    listener = excluded.listener, stopped_at = NULL, lock_timeout = excluded.lock_timeout,
    workflows = excluded.workflows, health = excluded.health, relay = excluded.relay,
    version = excluded.version, queues = excluded.queues;

-- name: worker_peers
-- The heartbeat's read of the other workers heard from since :since and not stopped, after its
-- upsert_worker in the same transaction (schema 13: what a worker routes wake-ups over; PostgreSQL reads
-- them in its `heartbeat` statement).
SELECT worker_id, host, pid, started_at, heartbeat_at, running, concurrency, listener, stopped_at,
       lock_timeout, workflows, health, relay, version, queues
FROM geste_workers
WHERE worker_id <> :worker_id AND stopped_at IS NULL AND heartbeat_at >= :since
ORDER BY worker_id LIMIT 1000;

-- name: mark_worker_stopped
UPDATE geste_workers SET stopped_at = :now, running = 0 WHERE worker_id = :worker_id;

-- name: prune_workers
DELETE FROM geste_workers WHERE heartbeat_at < ?;

-- name: list_workers
-- The table holds the workers heard from within a week (pruned at each start): a small scan.
SELECT worker_id, host, pid, started_at, heartbeat_at, running, concurrency, listener, stopped_at,
       lock_timeout, workflows, health, relay, version, queues
FROM geste_workers ORDER BY heartbeat_at DESC, worker_id LIMIT ?;

-- name: count_by_status
-- Covered by geste_instances_by_status (status, created_at): no table rows read.
SELECT status, count(*) AS n FROM geste_instances GROUP BY status;

-- name: count_runnable
-- What claims at :now could take (a status this version runs); per distinct workflow name with a free
-- instance that has a run_at or a held one, the two ranges a claim reads (schema 11): the free
-- instances due by :now and the leases that ran out by :now. It reads the runnable instances, never the
-- finished ones, nor those waiting for later, nor the leases still held.
WITH RECURSIVE names(name) AS (  -- a loose scan of both indexes: one probe of each per distinct name
    SELECT min(coalesce(f, h), coalesce(h, f)) FROM (
        SELECT (SELECT min(coalesce(runner, workflow_name)) FROM geste_instances
                WHERE run_at IS NOT NULL AND lease_id IS NULL
                  AND status IN ('pending', 'running', 'waiting', 'compensating')) AS f,
               (SELECT min(coalesce(runner, workflow_name)) FROM geste_instances
                WHERE lease_id IS NOT NULL
                  AND status IN ('pending', 'running', 'waiting', 'compensating')) AS h)
    UNION ALL
    SELECT (SELECT min(coalesce(f, h), coalesce(h, f)) FROM (
        SELECT (SELECT min(coalesce(i.runner, i.workflow_name)) FROM geste_instances i
                WHERE i.run_at IS NOT NULL AND i.lease_id IS NULL AND coalesce(i.runner, i.workflow_name) > n.name
                  AND i.status IN ('pending', 'running', 'waiting', 'compensating')) AS f,
               (SELECT min(coalesce(i.runner, i.workflow_name)) FROM geste_instances i
                WHERE i.lease_id IS NOT NULL AND coalesce(i.runner, i.workflow_name) > n.name
                  AND i.status IN ('pending', 'running', 'waiting', 'compensating')) AS h))
    FROM names n WHERE n.name IS NOT NULL
)
SELECT coalesce(sum((SELECT count(*) FROM geste_instances i
                     WHERE coalesce(i.runner, i.workflow_name) = n.name AND i.lease_id IS NULL AND i.run_at <= :now
                       AND i.status IN ('pending', 'running', 'waiting', 'compensating'))
                    + (SELECT count(*) FROM geste_instances i
                       WHERE coalesce(i.runner, i.workflow_name) = n.name AND i.lease_id IS NOT NULL AND i.run_at <= :now
                         AND i.lock_expires_at <= :now
                         AND i.status IN ('pending', 'running', 'waiting', 'compensating'))), 0) AS n
FROM names n WHERE n.name IS NOT NULL;

-- name: held_leases
-- A lease is only ever held by a running or compensating instance (claims and local starts make it
-- running; suspending and finishing release it), so geste_instances_by_status bounds the read.
SELECT locked_by, count(*) AS n FROM geste_instances
WHERE status IN ('running', 'compensating') AND lease_id IS NOT NULL AND lock_expires_at > :now
GROUP BY locked_by;

-- name: list_leases
-- The held leases themselves, soonest to expire first (bounded like held_leases, then sorted).
SELECT instance_id, workflow_name, locked_by, lock_expires_at FROM geste_instances
WHERE status IN ('running', 'compensating') AND lease_id IS NOT NULL AND lock_expires_at > :now
ORDER BY lock_expires_at, instance_id LIMIT :limit;

-- name: oldest_waiting
-- Through geste_instances_by_status: reads the waiting instances only (updated_at has no index of its
-- own, which every step commit would have to maintain).
SELECT min(updated_at) AS oldest FROM geste_instances WHERE status = 'waiting';

-- name: outbox_stats
-- For queue_stats: the pending and the dead outbox events, counted in their partial indexes (the cost
-- grows with those events, not with the delivered ones), and the creation time of the oldest pending one
-- (the first entry of geste_outbox_pending_by_created).
SELECT (SELECT count(*) FROM geste_outbox WHERE status = 'pending') AS pending,
       (SELECT count(*) FROM geste_outbox WHERE status = 'dead') AS dead,
       (SELECT created_at FROM geste_outbox WHERE status = 'pending' ORDER BY created_at LIMIT 1) AS oldest_pending;

-- name: outbox_insert
-- With the step that emits it (outbox_record). An event id already there is not stored again.
INSERT INTO geste_outbox
    (event_id, instance_id, step_seq, event_type, source, subject, data, status, attempts,
     next_attempt_at, created_at, updated_at)
VALUES (:event_id, :instance_id, :step_seq, :event_type, :source, :subject, :data, 'pending', 0,
        :now, :now, :now)
ON CONFLICT (event_id) DO NOTHING;

-- name: outbox_hold
-- Inside BEGIN IMMEDIATE, before outbox_claim: of the first :window due rows (soonest first), those with
-- an event of their instance before them that is not done (pending or dead: two probes of the partial
-- indexes by instance) leave the due range, so that no round reads them again: held (next_attempt_at
-- NULL) behind an event nobody sends (dead, or pending and unclaimed), until whoever ends that one makes
-- them due (outbox_promote); behind an event being sent, moved to the end of a claim (:claim_expires_at)
-- (its mark makes them due at once), as on PostgreSQL.
WITH win AS (
    SELECT event_id, instance_id, step_seq FROM geste_outbox
    WHERE status = 'pending' AND next_attempt_at <= :now
    ORDER BY next_attempt_at
    LIMIT :window
), before AS MATERIALIZED (
    SELECT w.event_id,
           (SELECT e.step_seq FROM geste_outbox e
            WHERE e.status = 'pending' AND e.instance_id = w.instance_id AND e.step_seq < w.step_seq
            ORDER BY e.step_seq DESC LIMIT 1) AS pending_seq,
           (SELECT e.claim_id IS NOT NULL FROM geste_outbox e
            WHERE e.status = 'pending' AND e.instance_id = w.instance_id AND e.step_seq < w.step_seq
            ORDER BY e.step_seq DESC LIMIT 1) AS pending_sent,
           (SELECT e.step_seq FROM geste_outbox e
            WHERE e.status = 'dead' AND e.instance_id = w.instance_id AND e.step_seq < w.step_seq
            ORDER BY e.step_seq DESC LIMIT 1) AS dead_seq
    FROM win w
)
UPDATE geste_outbox
SET next_attempt_at = CASE WHEN before.pending_sent
                                AND (before.dead_seq IS NULL OR before.dead_seq < before.pending_seq)
                           THEN :claim_expires_at END
FROM before
WHERE geste_outbox.event_id = before.event_id
  AND (before.pending_seq IS NOT NULL OR before.dead_seq IS NOT NULL);

-- name: outbox_claim
-- Inside BEGIN IMMEDIATE, after outbox_hold: of the first :window due rows, take up to :limit whose claim
-- is free or expired and that are the first of their instance not done (no earlier pending or dead
-- event: per-instance order); each claim counts as an attempt.
UPDATE geste_outbox
SET claimed_by = :relay_id, claim_id = :claim_id, claim_expires_at = :claim_expires_at,
    attempts = attempts + 1, updated_at = :now
WHERE event_id IN (
    SELECT o.event_id FROM geste_outbox o
    WHERE o.event_id IN (SELECT event_id FROM geste_outbox
                         WHERE status = 'pending' AND next_attempt_at <= :now
                         ORDER BY next_attempt_at
                         LIMIT :window)
      AND (o.claim_id IS NULL OR o.claim_expires_at <= :now)
      AND NOT EXISTS (SELECT 1 FROM geste_outbox e
                      WHERE e.status = 'pending' AND e.instance_id = o.instance_id
                        AND e.step_seq < o.step_seq)
      AND NOT EXISTS (SELECT 1 FROM geste_outbox e
                      WHERE e.status = 'dead' AND e.instance_id = o.instance_id
                        AND e.step_seq < o.step_seq)
    ORDER BY o.next_attempt_at
    LIMIT :limit
)
RETURNING event_id, instance_id, step_seq, event_type, source, subject, data, attempts, created_at;

-- name: outbox_mark_delivered
UPDATE geste_outbox
SET status = 'delivered', delivered_at = :now, updated_at = :now, next_attempt_at = NULL,
    claimed_by = NULL, claim_id = NULL, claim_expires_at = NULL
WHERE event_id = :event_id AND claim_id = :claim_id AND status = 'pending';

-- name: outbox_mark_failed
-- A NULL :next_attempt_at means no attempt is left: the event is dead (kept, with its last error).
UPDATE geste_outbox
SET status = CASE WHEN :next_attempt_at IS NULL THEN 'dead' ELSE 'pending' END,
    next_attempt_at = :next_attempt_at, last_error = :error, updated_at = :now,
    claimed_by = NULL, claim_id = NULL, claim_expires_at = NULL
WHERE event_id = :event_id AND claim_id = :claim_id AND status = 'pending';

-- name: outbox_promote
-- After an event is done (delivered, discarded): the next pending event of its instance is due now if it
-- was held (or moved to a claim's end) behind it.
UPDATE geste_outbox SET next_attempt_at = :now
WHERE event_id = (SELECT e.event_id FROM geste_outbox e, geste_outbox d
                  WHERE d.event_id = :event_id AND e.instance_id = d.instance_id
                    AND e.status = 'pending' AND e.step_seq > d.step_seq
                  ORDER BY e.step_seq LIMIT 1)
  AND (next_attempt_at IS NULL OR next_attempt_at > :now);

-- name: outbox_hold_next
-- After a failed attempt: the next pending event of the instance is held behind it (next_attempt_at
-- NULL), if it was not (moved to the end of the claim by outbox_hold while this one was being sent).
UPDATE geste_outbox SET next_attempt_at = NULL
WHERE event_id = (SELECT e.event_id FROM geste_outbox e, geste_outbox d
                  WHERE d.event_id = :event_id AND e.instance_id = d.instance_id
                    AND e.status = 'pending' AND e.step_seq > d.step_seq
                  ORDER BY e.step_seq LIMIT 1)
  AND next_attempt_at IS NOT NULL;

-- name: outbox_has_later
-- After a mark: whether the instance has a later pending event, which the mark may have unblocked.
SELECT EXISTS (SELECT 1 FROM geste_outbox
               WHERE instance_id = (SELECT instance_id FROM geste_outbox WHERE event_id = :event_id)
                 AND status = 'pending'
                 AND step_seq > (SELECT step_seq FROM geste_outbox WHERE event_id = :event_id)) AS later;

-- name: outbox_release
-- A relay stopping gives back the claims it could not finish: claimable again at once.
UPDATE geste_outbox SET claimed_by = NULL, claim_id = NULL, claim_expires_at = NULL, updated_at = :now
WHERE event_id = :event_id AND claim_id = :claim_id AND status = 'pending';

-- name: outbox_next_attempt_at
-- When the relay should look again: the earliest next_attempt_at of an event nobody sends (read in
-- next_attempt_at order until one is found: past the events being sent only), or the expiry of a claim
-- before it, if sooner (a relay that died: its events are taken over then). Held events (NULL) are not
-- read; an event that waits behind another but is not held yet counts (a claim round holds it).
WITH first AS MATERIALIZED (
    SELECT o.next_attempt_at AS at
    FROM geste_outbox o
    WHERE o.status = 'pending' AND o.next_attempt_at IS NOT NULL
      AND (o.claim_id IS NULL OR o.claim_expires_at <= o.next_attempt_at)
    ORDER BY o.next_attempt_at
    LIMIT 1
), sent AS MATERIALIZED (
    SELECT min(c.claim_expires_at) AS at
    FROM geste_outbox c
    WHERE c.status = 'pending' AND c.next_attempt_at <= coalesce((SELECT at FROM first), 1e308)
      AND c.claim_id IS NOT NULL AND c.claim_expires_at > c.next_attempt_at
)
SELECT CASE WHEN sent.at IS NULL OR first.at <= sent.at THEN first.at ELSE sent.at END AS at
FROM sent LEFT JOIN first;

-- name: outbox_list
SELECT event_id, instance_id, step_seq, event_type, source, subject, data, status, attempts,
       next_attempt_at, last_error, created_at, updated_at, delivered_at, claimed_by
FROM geste_outbox
WHERE (:status IS NULL OR status = :status) AND (:instance_id IS NULL OR instance_id = :instance_id)
ORDER BY created_at DESC, instance_id, step_seq DESC
LIMIT :limit;

-- name: outbox_retry
-- An operator re-queues a dead event: pending again, attempts from zero (its last error is kept).
UPDATE geste_outbox
SET status = 'pending', attempts = 0, next_attempt_at = :now, updated_at = :now
WHERE event_id = :event_id AND status = 'dead';

-- name: outbox_discard
-- An operator gives an event up (pending or dead): never sent again; then outbox_promote.
UPDATE geste_outbox
SET status = 'discarded', next_attempt_at = NULL, claimed_by = NULL, claim_id = NULL,
    claim_expires_at = NULL, updated_at = :now
WHERE event_id = :event_id AND status IN ('pending', 'dead');

-- Channels (ctx.subscribe / receive / publish / send_to). Every write runs inside BEGIN IMMEDIATE, so a
-- publish and a receive on the same channel never interleave: no lost wake-up, atomic competing claims.

-- name: channel_subscribe
-- An explicit ctx.subscribe: from the channel's last message on. A subscription there already in the same
-- mode is kept as it is, cursor and all (schema 15: one an earlier run of the instance made, which
-- continue_as_new carries over, so the messages it has not taken yet are the new run's); one in the
-- other mode (left by an attempt whose step was never recorded) is replaced.
INSERT INTO geste_channel_subscriptions (channel, instance_id, mode, cursor_seq, waiting_since, created_at)
VALUES (:channel, :instance_id, :mode,
        (SELECT COALESCE(MAX(seq), 0) FROM geste_channel_messages WHERE channel = :channel), NULL, :now)
ON CONFLICT (channel, instance_id) DO UPDATE SET
    cursor_seq = CASE WHEN mode = excluded.mode THEN cursor_seq ELSE excluded.cursor_seq END,
    created_at = CASE WHEN mode = excluded.mode THEN created_at ELSE excluded.created_at END,
    mode = excluded.mode, waiting_since = NULL;

-- name: channel_ensure_subscription
-- receive() on a channel: the subscription the workflow made (or the implicit one of a first receive).
INSERT INTO geste_channel_subscriptions (channel, instance_id, mode, cursor_seq, waiting_since, created_at)
VALUES (:channel, :instance_id, :mode,
        (SELECT COALESCE(MAX(seq), 0) FROM geste_channel_messages WHERE channel = :channel), NULL, :now)
ON CONFLICT (channel, instance_id) DO NOTHING;

-- name: channel_subscription
SELECT mode, cursor_seq FROM geste_channel_subscriptions
WHERE channel = :channel AND instance_id = :instance_id;

-- name: channel_next_message
-- The instance's next message, oldest first: one after its cursor (broadcast: every one; competing: one
-- nobody took), or a direct one not yet taken.
SELECT seq, message_id, channel, data, sender_instance_id, target_instance_id, created_at FROM (
    SELECT * FROM (
        SELECT seq, message_id, channel, data, sender_instance_id, target_instance_id, created_at
        FROM geste_channel_messages
        WHERE channel = :channel AND seq > :cursor AND target_instance_id IS NULL
          AND (:mode = 'broadcast' OR claimed_by IS NULL)
        ORDER BY seq LIMIT 1
    )
    UNION ALL
    SELECT * FROM (
        SELECT seq, message_id, channel, data, sender_instance_id, target_instance_id, created_at
        FROM geste_channel_messages
        WHERE target_instance_id = :instance_id AND channel = :channel AND claimed_by IS NULL
        ORDER BY seq LIMIT 1
    )
) ORDER BY seq LIMIT 1;

-- name: channel_claim
UPDATE geste_channel_messages SET claimed_by = :instance_id WHERE seq = :seq AND claimed_by IS NULL;

-- name: channel_advance
-- A message taken: the cursor moves past it (a direct one has no place in it); the wait is over.
UPDATE geste_channel_subscriptions
SET cursor_seq = CASE WHEN :direct THEN cursor_seq ELSE MAX(cursor_seq, :seq) END, waiting_since = NULL
WHERE channel = :channel AND instance_id = :instance_id;

-- name: channel_set_waiting
-- The instance waits on this channel, and on no other (a wait it left without taking a message or
-- timing out, by catching its cancellation, must not wake it).
UPDATE geste_channel_subscriptions
SET waiting_since = CASE WHEN channel = :channel THEN :now END
WHERE instance_id = :instance_id AND (channel = :channel OR waiting_since IS NOT NULL);

-- name: channel_stop_waiting
UPDATE geste_channel_subscriptions SET waiting_since = NULL
WHERE channel = :channel AND instance_id = :instance_id;

-- name: channel_instance_exists
SELECT 1 AS found FROM geste_instances WHERE instance_id = ?;

-- name: channel_insert_message
INSERT INTO geste_channel_messages
    (message_id, channel, data, sender_instance_id, target_instance_id, created_at)
VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (message_id) DO NOTHING;

-- name: channel_wake_receivers
-- The receivers a new message makes runnable: its target (a direct message); otherwise every waiting
-- broadcast subscriber and the competing subscriber idle the longest (one: only one can take it).
UPDATE geste_instances SET run_at = min(:now, {db_clock}), updated_at = :now
WHERE instance_id IN (
    SELECT s.instance_id FROM geste_channel_subscriptions s
    WHERE s.channel = :channel AND s.waiting_since IS NOT NULL
      AND CASE WHEN :target IS NOT NULL THEN s.instance_id = :target ELSE s.mode = 'broadcast' END
    UNION ALL
    SELECT * FROM (
        SELECT s.instance_id FROM geste_channel_subscriptions s
        JOIN geste_instances i ON i.instance_id = s.instance_id
        WHERE :target IS NULL AND s.channel = :channel AND s.mode = 'competing'
          AND s.waiting_since IS NOT NULL AND i.status = 'waiting'
          AND (i.run_at IS NULL OR i.run_at > min(:now, {db_clock}))
        ORDER BY s.waiting_since LIMIT 1
    )
) AND status = 'waiting' AND (run_at IS NULL OR run_at > min(:now, {db_clock}))
RETURNING instance_id;

-- name: channel_leftovers
-- The re-wake, 1/2 (schema 11): per channel with a waiting subscriber (a loose scan of
-- geste_channel_subscriptions_waiting), the lowest cursor of its waiting competing subscribers
-- (geste_channel_subscriptions_by_cursor), then the first message after it that nobody took, older than
-- :published_before (geste_channel_messages_unclaimed: it holds the messages not taken yet, so it reads
-- past the fresh ones only). A message published before every competing subscriber subscribed is before
-- every cursor: never read.
WITH RECURSIVE channels(name) AS (
    SELECT min(channel) FROM geste_channel_subscriptions WHERE waiting_since IS NOT NULL
    UNION ALL
    SELECT (SELECT min(s.channel) FROM geste_channel_subscriptions s
            WHERE s.waiting_since IS NOT NULL AND s.channel > c.name)
    FROM channels c WHERE c.name IS NOT NULL
), lowest AS (
    SELECT c.name AS channel,
           (SELECT s.cursor_seq FROM geste_channel_subscriptions s
            WHERE s.channel = c.name AND s.mode = 'competing' AND s.waiting_since IS NOT NULL
            ORDER BY s.cursor_seq LIMIT 1) AS cursor_seq
    FROM channels c WHERE c.name IS NOT NULL
)
SELECT * FROM (
    SELECT l.channel,
           (SELECT m.seq FROM geste_channel_messages m
            WHERE m.channel = l.channel AND m.seq > l.cursor_seq AND m.target_instance_id IS NULL
              AND m.claimed_by IS NULL AND m.created_at < :published_before
            ORDER BY m.seq LIMIT 1) AS seq
    FROM lowest l WHERE l.cursor_seq IS NOT NULL
) WHERE seq IS NOT NULL;

-- name: channel_rewake
-- The re-wake, 2/2, per channel channel_leftovers found: the idle waiting competing subscribers whose
-- cursor is before its message nobody took (:seq), at most :limit, in cursor order
-- (geste_channel_subscriptions_by_cursor), each instance a probe by key (an EXISTS, not a join: SQLite
-- built a Bloom filter over every subscription of the channel for one).
UPDATE geste_instances SET run_at = :now, updated_at = :now
WHERE instance_id IN (
    SELECT s.instance_id FROM geste_channel_subscriptions s
    WHERE s.channel = :channel AND s.mode = 'competing' AND s.cursor_seq < :seq
      AND s.waiting_since IS NOT NULL
      AND EXISTS (SELECT 1 FROM geste_instances i
                  WHERE i.instance_id = s.instance_id AND i.status = 'waiting' AND i.lease_id IS NULL
                    AND (i.run_at IS NULL OR i.run_at > :now))
    ORDER BY s.cursor_seq
    LIMIT :limit
) AND status = 'waiting' AND lease_id IS NULL
RETURNING instance_id;

-- name: channel_cleanup_subscriptions
-- Maintenance, bounded like every cleanup: the :limit subscriptions after the key (:channel,
-- :instance_id) in key order, each with whether its instance is finished (or deleted); the storage
-- deletes those (channel_delete_subscriptions) and goes on after the last one read at the next round
-- (schema 11; before, each round joined every subscription with its instance).
SELECT s.channel, s.instance_id,
       coalesce((SELECT i.status FROM geste_instances i WHERE i.instance_id = s.instance_id)
                IN ('completed', 'failed', 'cancelled'), 1) AS gone
FROM geste_channel_subscriptions s
WHERE (s.channel, s.instance_id) > (:channel, :instance_id)
ORDER BY s.channel, s.instance_id
LIMIT :limit;

-- name: channel_delete_subscriptions
DELETE FROM geste_channel_subscriptions
WHERE (channel, instance_id) IN (
    SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each(:keys)
);

-- name: channel_cleanup_messages
-- Messages past the retention (:before) that no subscriber needs: a direct one once taken or its target
-- finished; another once no broadcast subscriber's cursor is before it and, unless it was taken, no
-- competing subscriber's either (two probes of geste_channel_subscriptions_by_cursor). The :limit oldest
-- messages after the key (:at, :seq) in (created_at, seq) order (geste_channel_messages_by_created), each
-- with whether it may go; the storage deletes those (channel_delete_messages) and goes on after the last
-- one read at the next round (schema 11).
SELECT m.seq, m.created_at, CASE
    WHEN m.target_instance_id IS NOT NULL THEN m.claimed_by IS NOT NULL OR coalesce(
        (SELECT i.status FROM geste_instances i WHERE i.instance_id = m.target_instance_id)
        IN ('completed', 'failed', 'cancelled'), 1)
    ELSE coalesce((SELECT s.cursor_seq FROM geste_channel_subscriptions s
                   WHERE s.channel = m.channel AND s.mode = 'broadcast'
                   ORDER BY s.cursor_seq LIMIT 1) >= m.seq, 1)
         AND (m.claimed_by IS NOT NULL
              OR coalesce((SELECT s.cursor_seq FROM geste_channel_subscriptions s
                           WHERE s.channel = m.channel AND s.mode = 'competing'
                           ORDER BY s.cursor_seq LIMIT 1) >= m.seq, 1))
    END AS gone
FROM geste_channel_messages m
WHERE (m.created_at, m.seq) > (:at, :seq) AND m.created_at < :before
ORDER BY m.created_at, m.seq
LIMIT :limit;

-- name: channel_delete_messages
DELETE FROM geste_channel_messages WHERE seq IN (SELECT value FROM json_each(:seqs));

-- name: channel_cleanup_event_deliveries
-- The deliveries of the events channel_cleanup_events deletes next, in the same transaction.
DELETE FROM geste_event_deliveries WHERE event_seq IN (
    SELECT seq FROM geste_events WHERE created_at < :before ORDER BY created_at LIMIT :limit
);

-- name: channel_cleanup_event_keys
-- Their match keys (12), before the events (the same events: the same order).
DELETE FROM geste_event_keys WHERE event_seq IN (
    SELECT seq FROM geste_events WHERE created_at < :before ORDER BY created_at LIMIT :limit
);

-- name: channel_cleanup_events
-- Events past their retention, the oldest first (geste_events_by_created, schema 11).
DELETE FROM geste_events WHERE seq IN (
    SELECT seq FROM geste_events WHERE created_at < :before ORDER BY created_at LIMIT :limit
);

-- == the retention of finished instances (schema 29) ==================================================

-- name: prune_instances_examine
-- One bounded batch of the retention (docs/design.md "Retention of finished instances"): the :limit
-- finished instances (completed, failed, cancelled) that ended before :before, after the position
-- (:at, :id) in (finished_at, instance_id) order (a range of geste_instances_finished), each with whether
-- nothing still needs it (free): not while its parent is unfinished (the parent reads its outcome), one
-- of its children is unfinished (it reports to it), or its outbox holds a pending or dead event (the
-- relay or an operator still sends it); each a probe by index. The storage deletes the free ones with
-- their rows (prune_delete_*, in the same transaction) and goes on after the last one read at the next
-- batch, from the start again once a batch reads fewer than :limit.
SELECT i.instance_id, i.finished_at,
       (i.parent_id IS NULL
        OR coalesce((SELECT p.status FROM geste_instances p WHERE p.instance_id = i.parent_id)
                    IN ('completed', 'failed', 'cancelled'), 1))
       AND NOT EXISTS (SELECT 1 FROM geste_instances c
                       WHERE c.parent_id = i.instance_id
                         AND c.status IN ('pending', 'running', 'waiting', 'compensating'))
       AND NOT EXISTS (SELECT 1 FROM geste_outbox o WHERE o.instance_id = i.instance_id AND o.status = 'pending')
       AND NOT EXISTS (SELECT 1 FROM geste_outbox o WHERE o.instance_id = i.instance_id AND o.status = 'dead')
       AS free
FROM geste_instances i
WHERE i.status IN ('completed', 'failed', 'cancelled') AND i.finished_at < :before
  AND (i.finished_at, i.instance_id) > (:at, :id)
ORDER BY i.finished_at, i.instance_id
LIMIT :limit;

-- name: prune_delete_instances
-- The free instances of a batch (:ids, a JSON array), by primary key, still finished.
DELETE FROM geste_instances
WHERE instance_id IN (SELECT value FROM json_each(:ids)) AND status IN ('completed', 'failed', 'cancelled');

-- name: prune_delete_history
DELETE FROM geste_history WHERE instance_id IN (SELECT value FROM json_each(:ids));

-- name: prune_delete_runs
DELETE FROM geste_runs WHERE instance_id IN (SELECT value FROM json_each(:ids));

-- name: prune_delete_run_history
DELETE FROM geste_run_history WHERE instance_id IN (SELECT value FROM json_each(:ids));

-- name: prune_delete_timers
DELETE FROM geste_timers WHERE instance_id IN (SELECT value FROM json_each(:ids));

-- name: prune_delete_event_waits
DELETE FROM geste_event_waits WHERE instance_id IN (SELECT value FROM json_each(:ids));

-- name: prune_delete_event_deliveries
DELETE FROM geste_event_deliveries WHERE instance_id IN (SELECT value FROM json_each(:ids));

-- name: prune_delete_channel_subscriptions
DELETE FROM geste_channel_subscriptions WHERE instance_id IN (SELECT value FROM json_each(:ids));

-- name: prune_delete_outbox
DELETE FROM geste_outbox WHERE instance_id IN (SELECT value FROM json_each(:ids)) AND status IN ('delivered', 'discarded');

-- name: prune_delete_retries
DELETE FROM geste_retries WHERE instance_id IN (SELECT value FROM json_each(:ids));

-- name: prune_delete_state
DELETE FROM geste_state WHERE instance_id IN (SELECT value FROM json_each(:ids));

-- name: prune_delete_streams
DELETE FROM geste_streams WHERE instance_id IN (SELECT value FROM json_each(:ids));

-- name: prune_delete_stream_heads
DELETE FROM geste_stream_heads WHERE instance_id IN (SELECT value FROM json_each(:ids));

-- == chores (schema 11) ===============================================================================
-- Each periodic chore (runtime/chores.py) runs in one worker at a time, whichever process of those that
-- share this file it lives in: a round is taken with one upsert of its row in geste_chores.

-- name: chore_take
-- Take the chore :chore for worker :worker at :now if its round is due: the next one is then due at
-- :now + :interval. The holder of the last round takes it at next_at; another once the holder is :grace
-- late (it died or stalls), or once it gave the chore back (holder NULL). Returns the row if taken.
INSERT INTO geste_chores (chore, holder, next_at, taken_at) VALUES (:chore, :worker, :now + :interval, :now)
ON CONFLICT (chore) DO UPDATE
SET holder = excluded.holder, next_at = excluded.next_at, taken_at = excluded.taken_at
WHERE geste_chores.next_at <= :now
  AND (geste_chores.holder IS NULL OR geste_chores.holder = :worker OR geste_chores.next_at + :grace <= :now)
RETURNING next_at, holder;

-- name: chore_state
-- After chore_take took nothing, in its transaction: when the next round is due, and who holds it.
SELECT next_at, holder FROM geste_chores WHERE chore = :chore;

-- name: chore_release
-- A worker that stops gives its chores back: another takes each at its next round, without waiting.
UPDATE geste_chores SET holder = NULL WHERE holder = :worker;

-- == the web viewer (migration 6) ===================================================================
-- Keyset pages of instances, newest first by (created_at, instance_id): one query per filter
-- combination, each with its own index, so that a prepared statement's plan never depends on which
-- filters are set. The key bounds the page on one side and the created_at range on the other (the
-- caller folds the range's other end into the key). SQLite takes the row comparison on the index's
-- columns after the equality ones as the range of the scan (PostgreSQL wants them in the row too).

-- name: page_instances_all_older
-- Through geste_instances_by_created: a range scan of the index, from the key down.
SELECT instance_id, workflow_name, status, created_at, updated_at, finished_at, locked_by,
       cancel_requested, steps, substr(input, 1, :head) AS input_head
FROM geste_instances
WHERE (created_at, instance_id) < (:key_at, :key_id) AND created_at >= :bound
ORDER BY created_at DESC, instance_id DESC
LIMIT :limit;

-- name: page_instances_all_newer
-- Through geste_instances_by_created, from the key up (the caller reverses the page).
SELECT instance_id, workflow_name, status, created_at, updated_at, finished_at, locked_by,
       cancel_requested, steps, substr(input, 1, :head) AS input_head
FROM geste_instances
WHERE (created_at, instance_id) > (:key_at, :key_id) AND created_at < :bound
ORDER BY created_at, instance_id
LIMIT :limit;

-- name: page_instances_workflow_older
-- Through geste_instances_by_name: a range scan of the index, from the key down.
SELECT instance_id, workflow_name, status, created_at, updated_at, finished_at, locked_by,
       cancel_requested, steps, substr(input, 1, :head) AS input_head
FROM geste_instances
WHERE (created_at, instance_id) < (:key_at, :key_id) AND created_at >= :bound
  AND workflow_name = :f1
ORDER BY created_at DESC, instance_id DESC
LIMIT :limit;

-- name: page_instances_workflow_newer
-- Through geste_instances_by_name, from the key up (the caller reverses the page).
SELECT instance_id, workflow_name, status, created_at, updated_at, finished_at, locked_by,
       cancel_requested, steps, substr(input, 1, :head) AS input_head
FROM geste_instances
WHERE (created_at, instance_id) > (:key_at, :key_id) AND created_at < :bound
  AND workflow_name = :f1
ORDER BY created_at, instance_id
LIMIT :limit;

-- name: page_instances_status_older
-- Through geste_instances_by_status: a range scan of the index, from the key down.
SELECT instance_id, workflow_name, status, created_at, updated_at, finished_at, locked_by,
       cancel_requested, steps, substr(input, 1, :head) AS input_head
FROM geste_instances
WHERE (created_at, instance_id) < (:key_at, :key_id) AND created_at >= :bound
  AND status = :f1
ORDER BY created_at DESC, instance_id DESC
LIMIT :limit;

-- name: page_instances_status_newer
-- Through geste_instances_by_status, from the key up (the caller reverses the page).
SELECT instance_id, workflow_name, status, created_at, updated_at, finished_at, locked_by,
       cancel_requested, steps, substr(input, 1, :head) AS input_head
FROM geste_instances
WHERE (created_at, instance_id) > (:key_at, :key_id) AND created_at < :bound
  AND status = :f1
ORDER BY created_at, instance_id
LIMIT :limit;

-- name: page_instances_workflow_status_older
-- Through geste_instances_by_name_status: a range scan of the index, from the key down.
SELECT instance_id, workflow_name, status, created_at, updated_at, finished_at, locked_by,
       cancel_requested, steps, substr(input, 1, :head) AS input_head
FROM geste_instances
WHERE (created_at, instance_id) < (:key_at, :key_id) AND created_at >= :bound
  AND workflow_name = :f1 AND status = :f2
ORDER BY created_at DESC, instance_id DESC
LIMIT :limit;

-- name: page_instances_workflow_status_newer
-- Through geste_instances_by_name_status, from the key up (the caller reverses the page).
SELECT instance_id, workflow_name, status, created_at, updated_at, finished_at, locked_by,
       cancel_requested, steps, substr(input, 1, :head) AS input_head
FROM geste_instances
WHERE (created_at, instance_id) > (:key_at, :key_id) AND created_at < :bound
  AND workflow_name = :f1 AND status = :f2
ORDER BY created_at, instance_id
LIMIT :limit;

-- name: count_instances_all
-- Per status, at most :cap entries of geste_instances_by_status read: a count that costs the same on a
-- million instances as on a thousand, and says "at least :cap" beyond. The ORDER BY is the index's,
-- so that no plan scans the table instead.
SELECT s.status, (
    SELECT count(*) FROM (
        SELECT 1 FROM geste_instances i
        WHERE i.status = s.status AND i.created_at >= :lo AND i.created_at < :hi
        ORDER BY i.created_at
        LIMIT :cap
    )
) AS n
FROM (SELECT value AS status FROM json_each(:statuses)) AS s;

-- name: count_instances_workflow
-- As count_instances_all for one workflow name, through geste_instances_by_name_status.
SELECT s.status, (
    SELECT count(*) FROM (
        SELECT 1 FROM geste_instances i
        WHERE i.workflow_name = :workflow_name AND i.status = s.status
          AND i.created_at >= :lo AND i.created_at < :hi
        ORDER BY i.created_at
        LIMIT :cap
    )
) AS n
FROM (SELECT value AS status FROM json_each(:statuses)) AS s;

-- name: runnable_workflows
-- The workflow names that have instances runnable at :now (lease free or expired, a status this version
-- knows), each with how many, counted up to :cap: a loose index scan of geste_instances_runnable_by_name
-- and geste_instances_leased_by_name (one probe of each per distinct name), then at most :cap entries of
-- each index per name, the two ranges a claim reads.
WITH RECURSIVE names(name) AS (  -- a loose scan of both indexes: one probe of each per distinct name
    SELECT min(coalesce(f, h), coalesce(h, f)) FROM (
        SELECT (SELECT min(coalesce(runner, workflow_name)) FROM geste_instances
                WHERE run_at IS NOT NULL AND lease_id IS NULL
                  AND status IN ('pending', 'running', 'waiting', 'compensating')) AS f,
               (SELECT min(coalesce(runner, workflow_name)) FROM geste_instances
                WHERE lease_id IS NOT NULL
                  AND status IN ('pending', 'running', 'waiting', 'compensating')) AS h)
    UNION ALL
    SELECT (SELECT min(coalesce(f, h), coalesce(h, f)) FROM (
        SELECT (SELECT min(coalesce(i.runner, i.workflow_name)) FROM geste_instances i
                WHERE i.run_at IS NOT NULL AND i.lease_id IS NULL AND coalesce(i.runner, i.workflow_name) > n.name
                  AND i.status IN ('pending', 'running', 'waiting', 'compensating')) AS f,
               (SELECT min(coalesce(i.runner, i.workflow_name)) FROM geste_instances i
                WHERE i.lease_id IS NOT NULL AND coalesce(i.runner, i.workflow_name) > n.name
                  AND i.status IN ('pending', 'running', 'waiting', 'compensating')) AS h))
    FROM names n WHERE n.name IS NOT NULL
)
SELECT n.name AS workflow_name, min(:cap, (SELECT count(*) FROM (
    SELECT 1 FROM geste_instances i
    WHERE coalesce(i.runner, i.workflow_name) = n.name AND i.lease_id IS NULL AND i.run_at <= :now
      AND i.status IN ('pending', 'running', 'waiting', 'compensating')
    LIMIT :cap)) + (SELECT count(*) FROM (
    SELECT 1 FROM geste_instances i
    WHERE coalesce(i.runner, i.workflow_name) = n.name AND i.lease_id IS NOT NULL AND i.run_at <= :now
      AND i.lock_expires_at <= :now AND i.status IN ('pending', 'running', 'waiting', 'compensating')
    LIMIT :cap))) AS runnable
FROM names n WHERE n.name IS NOT NULL LIMIT :limit;

-- name: workflow_names
-- A loose index scan of geste_instances_by_name: one probe per distinct name, never every instance.
WITH RECURSIVE names(name) AS (
    SELECT min(workflow_name) FROM geste_instances
    UNION ALL
    SELECT (SELECT min(i.workflow_name) FROM geste_instances i WHERE i.workflow_name > n.name)
    FROM names n WHERE n.name IS NOT NULL
)
SELECT name FROM names WHERE name IS NOT NULL LIMIT :limit;

-- name: extras_timers
SELECT seq, expires_at FROM geste_timers WHERE instance_id = ? ORDER BY expires_at, seq;

-- name: extras_event_wait
SELECT event_type, match, since, deadline FROM geste_event_waits WHERE instance_id = ?;

-- name: extras_subscriptions
SELECT channel, mode, cursor_seq, waiting_since, created_at
FROM geste_channel_subscriptions WHERE instance_id = ? ORDER BY channel;

-- name: extras_outbox
-- By primary key: the ids (a JSON array) of the events the instance emitted, read from its history.
SELECT event_id, instance_id, step_seq, event_type, source, subject, data, status, attempts,
       next_attempt_at, last_error, created_at, updated_at, delivered_at, claimed_by
FROM geste_outbox WHERE event_id IN (SELECT value FROM json_each(?)) ORDER BY step_seq;

-- name: extras_messages
-- By their unique message_id (a JSON array): the messages the instance published (those not deleted).
SELECT message_id, channel, data, sender_instance_id, target_instance_id, created_at, claimed_by
FROM geste_channel_messages WHERE message_id IN (SELECT value FROM json_each(?)) ORDER BY seq;

-- Child workflows (16; docs/design.md, "Child workflows").

-- name: start_child
-- ctx.start_child, in the BEGIN IMMEDIATE transaction of touch_lease and insert_history of the parent's
-- start_child row: the child is created free and runnable, or queued onto :queue (schema 20: run_at NULL,
-- queued_at set, as insert_queued), or not (its id is taken, or its queue's dedup id: ON CONFLICT without
-- a target covers the primary key and the dedup index). One primary-key probe (and one of the dedup index).
INSERT INTO geste_instances
    (instance_id, workflow_name, status, input, created_at, updated_at, run_at, event_floor,
     parent_id, parent_close, deadline, queue, priority, queued_at, dedup_id, partition_key, version, pinned,
     trace_context)
VALUES (:instance_id, :workflow_name, 'pending', :input, :now, :now,
        CASE WHEN :queue IS NULL THEN min(:now, {db_clock}) END,
        coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'geste_events'), 0), :parent_id, :parent_close,
        :deadline, :queue, :priority, CASE WHEN :queue IS NOT NULL THEN :now END, :dedup_id,
        CASE WHEN :queue IS NOT NULL THEN :partition_key END, :version, :pinned, :trace_context)
ON CONFLICT DO NOTHING;

-- name: child_state
SELECT workflow_name, status, result, error, parent_id FROM geste_instances WHERE instance_id = ?;

-- name: wake_parent
-- A child's end (finish, cancel_unstarted) makes its waiting parent runnable, in the same transaction.
UPDATE geste_instances SET run_at = min(coalesce(run_at, :now), :now, {db_clock})
WHERE instance_id = (SELECT parent_id FROM geste_instances WHERE instance_id = :instance_id)
  AND lease_id IS NULL AND status = 'waiting';

-- name: list_children
SELECT instance_id, workflow_name, status, input, result, error, created_at, updated_at, finished_at,
       run_at, locked_by, lock_expires_at, cancel_requested, steps, run, last_worker, parent_id, deadline
FROM geste_instances
WHERE parent_id = ?
ORDER BY created_at, instance_id
LIMIT ?;

-- name: cancel_children
-- The parent-close policies (16), in the parent's end's transaction (finish): the children named
-- (:children, a JSON array: those the end cancels) still running and not asked already are flagged as
-- flag_cancel flags one, and their parent_close set to 'cancelled'. One probe of the key per child.
UPDATE geste_instances
SET cancel_requested = 1, updated_at = :now, parent_close = 'cancelled',
    run_at = CASE WHEN lease_id IS NULL AND (run_at IS NULL OR run_at > min(:now, {db_clock}))
                  THEN min(:now, {db_clock}) ELSE run_at END
WHERE instance_id IN (SELECT value FROM json_each(:children)) AND parent_id = :instance_id
  AND status IN ('pending', 'running', 'waiting', 'compensating') AND cancel_requested = 0;

-- == cron schedules (migration 19) ================================================================
-- name: schedule_upsert
-- A declared schedule (at App open) or app.create_schedule: its definition written; its next tick kept
-- while it ticks at the same moments (a restart does not lose the ticks it missed), recomputed otherwise.
-- A paused schedule stays paused.
INSERT INTO geste_schedules
    (name, workflow_name, cron, timezone, missed, overlap, pass_tick, next_tick, created_at, updated_at,
     queue, priority)
VALUES (:name, :workflow_name, :cron, :timezone, :missed, :overlap, :pass_tick, :next_tick, :now, :now,
        :queue, :priority)
ON CONFLICT (name) DO UPDATE
SET workflow_name = excluded.workflow_name, missed = excluded.missed, overlap = excluded.overlap,
    pass_tick = excluded.pass_tick, updated_at = excluded.updated_at, queue = excluded.queue,
    priority = excluded.priority,
    next_tick = CASE WHEN geste_schedules.cron = excluded.cron AND geste_schedules.timezone = excluded.timezone
                     THEN geste_schedules.next_tick ELSE excluded.next_tick END,
    cron = excluded.cron, timezone = excluded.timezone;

-- name: schedules_due
-- Through geste_schedules_due: the due schedules, earliest first, at most :limit.
SELECT name, workflow_name, cron, timezone, missed, overlap, pass_tick, paused, next_tick, last_tick,
       last_instance_id, queue, priority, waiting
FROM geste_schedules WHERE paused = 0 AND next_tick <= :now
ORDER BY next_tick LIMIT :limit;

-- name: schedule_next_tick
-- Through geste_schedules_due: its first entry.
SELECT min(next_tick) AS next_tick FROM geste_schedules WHERE paused = 0;

-- name: schedule_advance
-- The round's claim on a tick: moves next_tick from the value it read; no row: another worker did first.
UPDATE geste_schedules SET next_tick = :next_tick, updated_at = :now
WHERE name = :name AND next_tick = :expected AND paused = 0
RETURNING last_instance_id, waiting;

-- name: schedule_started
UPDATE geste_schedules SET last_tick = :tick, last_instance_id = :instance_id WHERE name = :name;

-- name: schedule_last_unfinished
-- Whether the schedule's last instance has not ended (overlap skip and queue): one primary-key probe.
SELECT 1 FROM geste_instances
WHERE instance_id = :instance_id AND status IN ('pending', 'running', 'waiting', 'compensating');

-- name: schedule_wait
-- overlap = 'queue' (schema 24): a tick put to wait for the last run to end, in the round's transaction.
INSERT INTO geste_schedule_waiting (name, tick) VALUES (:name, :tick) ON CONFLICT DO NOTHING;

-- name: schedule_waiting_add
UPDATE geste_schedules SET waiting = waiting + :added WHERE name = :name;

-- name: schedules_waiting
-- Through geste_schedules_waiting: the unpaused schedules with ticks waiting, each with its oldest tick
-- and whether its last run has ended; those ended first.
SELECT s.name, s.workflow_name, s.cron, s.timezone, s.missed, s.overlap, s.pass_tick, s.paused,
       s.next_tick, s.last_tick, s.last_instance_id, s.queue, s.priority, s.waiting,
       (SELECT min(w.tick) FROM geste_schedule_waiting AS w WHERE w.name = s.name) AS first_tick,
       NOT EXISTS (SELECT 1 FROM geste_instances AS i
                   WHERE i.instance_id = s.last_instance_id
                     AND i.status IN ('pending', 'running', 'waiting', 'compensating')) AS ready
FROM geste_schedules AS s
WHERE s.waiting > 0 AND s.paused = 0
ORDER BY ready DESC, s.name
LIMIT :limit;

-- name: schedule_lock
SELECT paused, last_instance_id FROM geste_schedules WHERE name = :name;

-- name: schedule_unwait_tick
-- A release (schema 24): the tick taken off the waiting ones (no row deleted: released already).
DELETE FROM geste_schedule_waiting WHERE name = :name AND tick = :tick;

-- name: schedule_unwait
UPDATE geste_schedules
SET waiting = waiting - 1, last_tick = :tick, last_instance_id = :instance_id, updated_at = :now
WHERE name = :name;

-- name: get_schedule
SELECT name, workflow_name, cron, timezone, missed, overlap, pass_tick, paused, next_tick, last_tick,
       last_instance_id, queue, priority, waiting
FROM geste_schedules WHERE name = :name;

-- name: list_schedules
SELECT name, workflow_name, cron, timezone, missed, overlap, pass_tick, paused, next_tick, last_tick,
       last_instance_id, queue, priority, waiting
FROM geste_schedules ORDER BY name LIMIT :limit;

-- name: schedule_pause
UPDATE geste_schedules SET paused = 1, updated_at = :now WHERE name = :name;

-- name: schedule_resume
-- Resumed: its next tick is the first to come (the ticks that passed while paused are not started).
UPDATE geste_schedules SET paused = 0, next_tick = :next_tick, updated_at = :now WHERE name = :name;

-- name: schedule_delete_waiting
-- Its waiting ticks (schema 24), in the transaction that deletes the schedule.
DELETE FROM geste_schedule_waiting WHERE name = :name;

-- name: schedule_delete
DELETE FROM geste_schedules WHERE name = :name;

-- name: queue_upsert
-- A declared queue's limits (App open, before its worker claims): the last App opened sets them.
-- The admission times of the window (starts) are kept.
INSERT INTO geste_queues
    (name, concurrency, worker_concurrency, rate_limit, rate_period, updated_at, partition_concurrency,
     partition_rate_limit)
VALUES (:name, :concurrency, :worker_concurrency, :rate_limit, :rate_period, :now, :partition_concurrency,
        :partition_rate_limit)
ON CONFLICT (name) DO UPDATE
SET concurrency = excluded.concurrency, worker_concurrency = excluded.worker_concurrency,
    rate_limit = excluded.rate_limit, rate_period = excluded.rate_period, updated_at = excluded.updated_at,
    partition_concurrency = excluded.partition_concurrency,
    partition_rate_limit = excluded.partition_rate_limit;

-- name: insert_queued
-- A start onto a queue (schema 20): pending, queued (queued_at) and run_at NULL, so that no claim by
-- workflow or by id can take it: only queue_take admits it. ON CONFLICT DO NOTHING without a target covers
-- the primary key and the dedup index (one unfinished instance per queue and dedup id).
INSERT INTO geste_instances
    (instance_id, workflow_name, status, input, created_at, updated_at, run_at, event_floor, deadline,
     queue, priority, queued_at, dedup_id, partition_key, version, pinned, trace_context)
VALUES (:instance_id, :workflow_name, 'pending', :input, :now, :now, NULL,
        coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'geste_events'), 0), :deadline,
        :queue, :priority, :now, :dedup_id, :partition_key, :version, :pinned, :trace_context)
ON CONFLICT DO NOTHING;

-- name: find_dedup
-- The unfinished instance of a queue holding a dedup id (the unique partial index, one probe).
SELECT instance_id FROM geste_instances
WHERE queue = :queue AND dedup_id = :dedup_id AND status IN ('pending', 'running', 'waiting', 'compensating');

-- name: queue_runnable
-- serve_unqueued=False: the instances admitted by the served queues (:queues, a JSON array) and
-- unfinished (geste_instances_queue_admitted), of the registered workflows (:names), free and due by :due
-- or held by a lease that ran out at :now, earliest first, at most :limit; then one row with a NULL id,
-- the earliest run_at after :due among the free ones. claim_ids takes them.
SELECT * FROM (
    SELECT instance_id, run_at FROM geste_instances
    WHERE queue IN (SELECT value FROM json_each(:queues)) AND queue IS NOT NULL AND queued_at IS NULL
      AND status IN ('pending', 'running', 'waiting', 'compensating')
      AND coalesce(runner, workflow_name) IN (SELECT value FROM json_each(:names))
      AND ((lease_id IS NULL AND run_at <= :due) OR (lease_id IS NOT NULL AND lock_expires_at <= :now))
    ORDER BY run_at
    LIMIT :limit)
UNION ALL
SELECT NULL, min(run_at) FROM geste_instances
WHERE queue IN (SELECT value FROM json_each(:queues)) AND queue IS NOT NULL AND queued_at IS NULL
  AND status IN ('pending', 'running', 'waiting', 'compensating')
  AND coalesce(runner, workflow_name) IN (SELECT value FROM json_each(:names))
  AND lease_id IS NULL AND run_at > :due;

-- name: queue_waiting
-- Whether the queue has a queued instance (the head of its line): an idle queue costs this probe only.
SELECT 1 FROM geste_instances
WHERE queue = :queue AND queued_at IS NOT NULL AND status = 'pending'
LIMIT 1;

-- name: queue_limit
SELECT concurrency, rate_limit, rate_period, starts, partition_concurrency, partition_rate_limit
FROM geste_queues WHERE name = :queue;

-- name: queue_partitions
-- The partitions of the queue holding queued work (schema 22), in the order of their heads (priority,
-- then start): a loose scan of geste_instances_queued_partition, one probe per partition, then one probe
-- for each one's head.
WITH RECURSIVE parts(k) AS (
    SELECT (SELECT partition_key FROM geste_instances
            WHERE queue = :queue AND queued_at IS NOT NULL AND status = 'pending'
            ORDER BY partition_key LIMIT 1)
    UNION ALL
    SELECT (SELECT partition_key FROM geste_instances
            WHERE queue = :queue AND queued_at IS NOT NULL AND status = 'pending' AND partition_key > parts.k
            ORDER BY partition_key LIMIT 1)
    FROM parts WHERE parts.k IS NOT NULL
)
SELECT k AS partition_key,
       (SELECT priority FROM geste_instances
        WHERE queue = :queue AND partition_key = parts.k AND queued_at IS NOT NULL AND status = 'pending'
        ORDER BY priority, queued_at LIMIT 1) AS priority,
       (SELECT queued_at FROM geste_instances
        WHERE queue = :queue AND partition_key = parts.k AND queued_at IS NOT NULL AND status = 'pending'
        ORDER BY priority, queued_at LIMIT 1) AS queued_at
FROM parts WHERE k IS NOT NULL
ORDER BY 2, 3, 1;

-- name: queue_partition_busy
-- A partition's slots in use (admitted and unfinished), at most :limit of them read.
SELECT count(*) AS busy FROM (
    SELECT 1 FROM geste_instances
    WHERE queue = :queue AND partition_key = :key AND queued_at IS NULL
      AND status IN ('pending', 'running', 'waiting', 'compensating')
    LIMIT :limit
);

-- name: queue_partition_window
-- A partition's rate window (the admission times of the last window, a JSON array), if it has one.
SELECT starts FROM geste_queue_partitions WHERE queue = :queue AND key = :key;

-- name: queue_partition_next
-- A partition's next queued instance after the one last taken (a keyset probe of its line).
SELECT instance_id, priority, queued_at FROM geste_instances
WHERE queue = :queue AND partition_key = :key AND queued_at IS NOT NULL AND status = 'pending'
  AND (priority, queued_at, instance_id) > (:priority, :queued_at, :instance_id)
ORDER BY priority, queued_at, instance_id
LIMIT 1;

-- name: queue_partition_started
-- A partition's rate window after a claim that admitted from it.
INSERT INTO geste_queue_partitions (queue, key, starts) VALUES (:queue, :key, :starts)
ON CONFLICT (queue, key) DO UPDATE SET starts = excluded.starts;

-- name: queue_take_ids
-- Admit and claim the instances a partitioned claim picked (a JSON array of ids), inside its BEGIN
-- IMMEDIATE. By primary key: the unary + keeps the status and queue conditions off every index (with
-- them indexable, SQLite searched the status index and read every pending instance).
UPDATE geste_instances
SET locked_by = :worker_id,
    lease_id = :lease_prefix || instance_id,
    lock_expires_at = :lock_expires_at,
    run_at = :lock_expires_at,
    status = 'running',
    queued_at = NULL,
    updated_at = :now
WHERE instance_id IN (SELECT value FROM json_each(:ids)) AND +queued_at IS NOT NULL AND +status = 'pending'
RETURNING instance_id, lease_id, workflow_name, input, status, created_at, cancel_requested, run, deadline,
          NULL AS run_at;

-- name: queue_started
-- The admission times of the queue's rate window, after a claim that admitted (a JSON array).
UPDATE geste_queues SET starts = :starts WHERE name = :queue;

-- name: queue_busy
-- The queue's slots in use (admitted and unfinished), at most :limit of them read.
SELECT count(*) AS busy FROM (
    SELECT 1 FROM geste_instances
    WHERE queue = :queue AND queued_at IS NULL
      AND status IN ('pending', 'running', 'waiting', 'compensating')
    LIMIT :limit
);

-- name: queue_take
-- Admit and claim the first :n of the queue's line (priority, then first come first served), inside the
-- claim's BEGIN IMMEDIATE (one writer: the count read before it is still true).
UPDATE geste_instances
SET locked_by = :worker_id,
    lease_id = :lease_prefix || instance_id,
    lock_expires_at = :lock_expires_at,
    run_at = :lock_expires_at,
    status = 'running',
    queued_at = NULL,
    updated_at = :now
WHERE instance_id IN (
    SELECT instance_id FROM geste_instances
    WHERE queue = :queue AND queued_at IS NOT NULL AND status = 'pending'
    ORDER BY queue, priority, queued_at
    LIMIT :n)
RETURNING instance_id, lease_id, workflow_name, input, status, created_at, cancel_requested, run, deadline,
          NULL AS run_at;

-- name: list_queues
-- The queues by name, at most :limit, as the PostgreSQL query says: declared or named by queued or admitted
-- instances (a loose scan of the two partial indexes), each with its queued and admitted instances (at most
-- :cap index entries read each), the admissions of its rate window after :now - rate_period, and the start
-- of its oldest queued instance, the oldest of the first entries of the first :levels priorities of its
-- line (two probes each: the next priority, then its first entry).
WITH RECURSIVE waiting(name) AS (
    SELECT (SELECT min(queue) FROM geste_instances WHERE queued_at IS NOT NULL AND status = 'pending')
    UNION ALL
    SELECT (SELECT min(i.queue) FROM geste_instances i
            WHERE i.queued_at IS NOT NULL AND i.status = 'pending' AND i.queue > w.name)
    FROM waiting w WHERE w.name IS NOT NULL
), busy(name) AS (
    SELECT (SELECT min(queue) FROM geste_instances
            WHERE queue IS NOT NULL AND queued_at IS NULL
              AND status IN ('pending', 'running', 'waiting', 'compensating'))
    UNION ALL
    SELECT (SELECT min(i.queue) FROM geste_instances i
            WHERE i.queue IS NOT NULL AND i.queued_at IS NULL
              AND i.status IN ('pending', 'running', 'waiting', 'compensating') AND i.queue > b.name)
    FROM busy b WHERE b.name IS NOT NULL
), names(name) AS (
    SELECT * FROM (SELECT name FROM geste_queues ORDER BY name LIMIT :limit)
    UNION
    SELECT * FROM (SELECT name FROM waiting WHERE name IS NOT NULL LIMIT :limit)
    UNION
    SELECT * FROM (SELECT name FROM busy WHERE name IS NOT NULL LIMIT :limit)
)
SELECT n.name, q.name IS NOT NULL AS declared, q.concurrency, q.worker_concurrency, q.rate_limit,
       q.rate_period,
       (SELECT count(*) FROM (
            SELECT 1 FROM geste_instances i
            WHERE i.queue = n.name AND i.queued_at IS NOT NULL AND i.status = 'pending'
            ORDER BY i.queue, i.priority, i.queued_at
            LIMIT :cap)) AS queued,
       (SELECT count(*) FROM (
            SELECT 1 FROM geste_instances i
            WHERE i.queue = n.name AND i.queued_at IS NULL
              AND i.status IN ('pending', 'running', 'waiting', 'compensating')
            LIMIT :cap)) AS admitted,
       (SELECT count(*) FROM json_each(q.starts) AS s WHERE s.value > :now - q.rate_period) AS rate_used,
       (WITH RECURSIVE levels(p) AS (
            SELECT (SELECT i.priority FROM geste_instances i
                    WHERE i.queue = n.name AND i.queued_at IS NOT NULL AND i.status = 'pending'
                    ORDER BY i.queue, i.priority, i.queued_at LIMIT 1)
            UNION ALL
            SELECT (SELECT i.priority FROM geste_instances i
                    WHERE i.queue = n.name AND i.priority > l.p
                      AND i.queued_at IS NOT NULL AND i.status = 'pending'
                    ORDER BY i.queue, i.priority, i.queued_at LIMIT 1)
            FROM levels l WHERE l.p IS NOT NULL
        )
        SELECT min((SELECT i.queued_at FROM geste_instances i
                    WHERE i.queue = n.name AND i.priority = x.p
                      AND i.queued_at IS NOT NULL AND i.status = 'pending'
                    ORDER BY i.queue, i.priority, i.queued_at LIMIT 1))
        FROM (SELECT p FROM levels WHERE p IS NOT NULL LIMIT :levels) AS x) AS oldest_queued_at
FROM names n LEFT JOIN geste_queues q ON q.name = n.name
ORDER BY n.name
LIMIT :limit;

-- Published state (schema 25; docs/state.md, docs/design.md "Published state").

-- name: state_insert
-- ctx.set_state, after the step commit (`_append`) in the same transaction: the key's next version (one
-- backward probe of the primary key; the one writer of SQLite, and the lease, serialise them).
INSERT INTO geste_state (instance_id, key, version, value, run, seq, created_at)
SELECT :instance_id, :key,
       COALESCE((SELECT version FROM geste_state
                 WHERE instance_id = :instance_id AND key = :key ORDER BY version DESC LIMIT 1), 0) + 1,
       :value, :run, :seq, :now
RETURNING version;

-- name: get_state
-- handle.get_state / wait_state: the instance's status and the latest value of :key (or :version), by
-- primary keys; no row when the instance does not exist.
SELECT i.status, s.key, s.version, s.value, s.run, s.seq, s.created_at
FROM geste_instances i
LEFT JOIN geste_state s
    ON s.instance_id = i.instance_id AND s.key = :key
   AND s.version = COALESCE(:version, (SELECT max(version) FROM geste_state
                                       WHERE instance_id = :instance_id AND key = :key))
WHERE i.instance_id = :instance_id;

-- name: list_state
-- The latest value of each of the instance's keys, at most :limit keys by key (the viewer's, the HTTP
-- API's): SQLite's bare columns of a max() aggregate are those of the row holding the max.
SELECT key, max(version) AS version, value, run, seq, created_at
FROM geste_state WHERE instance_id = :instance_id
GROUP BY key ORDER BY key
LIMIT :limit;

-- name: stream_head
-- A stream's head (26): its next position and whether it is closed.
SELECT next_position, closed FROM geste_stream_heads WHERE instance_id = ? AND key = ?;

-- name: stream_insert
-- One item of a write batch at the position given, unless the stream holds its writer already (a replay's
-- or a retried activity's rewrite: nothing written).
INSERT INTO geste_streams (instance_id, key, position, writer, item, written_at)
SELECT ?1, ?2, ?3, ?4, ?5, ?6
WHERE NOT EXISTS (SELECT 1 FROM geste_streams WHERE instance_id = ?1 AND key = ?2 AND writer = ?4);

-- name: stream_set_head
INSERT INTO geste_stream_heads (instance_id, key, next_position, closed) VALUES (?, ?, ?, ?)
ON CONFLICT (instance_id, key) DO UPDATE
    SET next_position = excluded.next_position, closed = excluded.closed;

-- name: stream_read
-- The items of a stream from a position on, in order: a range scan of the primary key.
SELECT position, item FROM geste_streams
WHERE instance_id = ? AND key = ? AND position >= ?
ORDER BY position LIMIT ?;

-- name: stream_instance_status
SELECT status FROM geste_instances WHERE instance_id = ?;

-- name: stream_list
SELECT key, next_position, closed FROM geste_stream_heads
WHERE instance_id = ? ORDER BY key LIMIT ?;

-- name: patches
-- `geste patches` (schema 27; docs/versioning.md): per workflow and patch id, its markers in the current
-- runs' histories (a scan of geste_history_patches: one entry per marker, joined to its instance by key)
-- with the first one's time, and its old runs: the unfinished instances of the workflow whose current run
-- started before that first marker and whose history lacks it (a range of
-- geste_instances_by_name_status per unfinished status, each instance probed in geste_history_patches).
-- At most :limit patches.
WITH marked AS (
    SELECT i.workflow_name, h.name AS patch_id, min(h.created_at) AS first_at, count(*) AS marked
    FROM geste_history AS h JOIN geste_instances AS i ON i.instance_id = h.instance_id
    WHERE h.kind = 'patch'
    GROUP BY i.workflow_name, h.name
    ORDER BY i.workflow_name, h.name
    LIMIT :limit
)
SELECT m.workflow_name, m.patch_id, m.first_at, m.marked,
       (SELECT count(*) FROM geste_instances AS o
        WHERE o.workflow_name = m.workflow_name
          AND o.status IN ('pending', 'running', 'waiting', 'compensating')
          AND o.created_at < m.first_at AND coalesce(o.run_started_at, o.created_at) < m.first_at
          AND NOT EXISTS (SELECT 1 FROM geste_history AS x
                          WHERE x.kind = 'patch' AND x.name = m.patch_id AND x.instance_id = o.instance_id)
       ) AS old_runs
FROM marked AS m
ORDER BY m.workflow_name, m.patch_id;

-- name: trace_context
-- The W3C trace context recorded at the instance's start (schema 30; docs/tracing.md): read at the start of
-- a run when tracing is on, never otherwise. One primary-key probe.
SELECT trace_context FROM geste_instances WHERE instance_id = ?;
