-- geste schema, version 11 (SQLite): claims and chores read what is due, not what the tables hold.

-- Claims step over no held lease. A held instance's run_at is now its take-over time: the expiry of its
-- lease as of its claim (or local start), moved on by its worker's heartbeat when less than half a lease
-- is left, never by a step commit. The runnable index holds the free instances only; the held ones are
-- in a second index, in take-over order, so a claim reads the free instances due and the leases that ran
-- out, and never the live leases (before, a held instance kept the run_at of its claim, and every claim of
-- its workflow read past it: 10,000 held leases made a claim read 10,000 rows to find one free
-- instance). The two indexes hold each row at most once, as the one they replace did. Held instances get
-- their take-over time here, once.
UPDATE geste_instances SET run_at = lock_expires_at WHERE lease_id IS NOT NULL;
DROP INDEX geste_instances_runnable_by_name;
CREATE INDEX geste_instances_runnable_by_name ON geste_instances (workflow_name, run_at)
    WHERE run_at IS NOT NULL AND lease_id IS NULL;
CREATE INDEX geste_instances_leased_by_name ON geste_instances (workflow_name, run_at)
    WHERE lease_id IS NOT NULL;
