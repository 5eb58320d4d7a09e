-- geste schema, version 14 (PostgreSQL): a result() awaited in another process is woken by the end of the
-- instance, not by its next poll (issue 15; docs/design.md, "Results awaited in another process").
-- One row per result() call that waits for an instance its process does not hold: waiter is the call's
-- own id, process the worker id of its App. The statements that end an instance (finish, finish_batch,
-- cancel_unstarted) delete its rows by key in the same statement and, when a row of a process other than
-- the ending worker's was there, send one geste_workflow_resumable with a "finished" field. No row, the
-- common case: one probe of the primary key, no NOTIFY (so no notify lock at commit, pitfall 1).
-- A table of its own, not a column of geste_instances, and no foreign key to it: either would lock the
-- instance's row (the write, or the key check's KEY SHARE) while a waiter registers, and a claim's
-- FOR UPDATE SKIP LOCKED would skip the instance meanwhile and lose its wake-up.
-- expires_at: a waiter renews its row while it waits (every half of geste._client.RESULT_WATCH_TTL); the
-- rows of waiters that died are past it, and the cleanup chore deletes them in expiry order.
CREATE TABLE {schema}.geste_result_waiters (
    instance_id text NOT NULL,
    waiter      text NOT NULL,
    process     text NOT NULL,
    expires_at  double precision NOT NULL,
    PRIMARY KEY (instance_id, waiter)
);
CREATE INDEX geste_result_waiters_by_expiry ON {schema}.geste_result_waiters (expires_at);
