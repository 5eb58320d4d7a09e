-- geste schema, version 11 (PostgreSQL): claims and chores read what is due, not what the tables hold;
-- each chore runs in one worker of the cluster at a time.

-- Claims step over no held lease. A held instance's run_at is now its take-over time: the expiry of its
-- lease as of its claim (or local start), moved on by its worker's heartbeat when less than half a lease
-- is left, never by a step commit (which renews lock_expires_at only, so stays a HOT update). The runnable
-- index holds the free instances only; the held ones are in a second index, in take-over order, so a
-- claim reads the free instances due and the leases that ran out, and never the live leases (before, a
-- held instance kept the run_at of its claim, and every claim of its workflow read past it: 10,000 held
-- leases made a claim read 10,000 rows to find one free instance). The two indexes hold each row at most
-- once, as the one they replace did; both hold only the statuses a claim takes (the status is in the
-- predicate, so that the planner, knowing the index holds no finished instance, never joins the status
-- index to it and sorts). Held instances get their take-over time here, once.
UPDATE {schema}.geste_instances SET run_at = lock_expires_at WHERE lease_id IS NOT NULL;
DROP INDEX {schema}.geste_instances_runnable_by_name;
CREATE INDEX geste_instances_runnable_by_name ON {schema}.geste_instances (workflow_name, run_at)
    WHERE run_at IS NOT NULL AND lease_id IS NULL
      AND status IN ('pending', 'running', 'waiting', 'compensating');
CREATE INDEX geste_instances_leased_by_name ON {schema}.geste_instances (workflow_name, run_at)
    WHERE lease_id IS NOT NULL AND status IN ('pending', 'running', 'waiting', 'compensating');

-- Chores run by one worker of the cluster at a time (runtime/chores.py): one row per chore, taken for a
-- round by a conditional upsert when its next round is due. The worker that took the last round (holder)
-- takes the next at next_at; another only once the holder is a round late (next_at + the chore's
-- interval), or once it gave the chore back (holder NULL, at its stop). A row each: fillfactor 50, so
-- that each round is a HOT update.
CREATE TABLE {schema}.geste_chores (
    chore    text PRIMARY KEY,
    holder   text,
    next_at  double precision NOT NULL,
    taken_at double precision
) WITH (fillfactor = 50);

-- The chores' statements read what is due: the retention of events and of messages walks their age
-- (rows older than the retention, oldest first, from where the last round stopped); the re-wake finds,
-- per channel, the lowest cursor of a waiting competing subscriber and the first message nobody took
-- after it; whether a message is still needed is a probe of the subscribers' cursors.
CREATE INDEX geste_events_by_created ON {schema}.geste_events (created_at);
CREATE INDEX geste_channel_messages_by_created ON {schema}.geste_channel_messages (created_at, seq);
CREATE INDEX geste_channel_messages_unclaimed ON {schema}.geste_channel_messages (channel, seq)
    WHERE target_instance_id IS NULL AND claimed_by IS NULL;
CREATE INDEX geste_channel_subscriptions_by_cursor ON {schema}.geste_channel_subscriptions
    (channel, mode, cursor_seq);
