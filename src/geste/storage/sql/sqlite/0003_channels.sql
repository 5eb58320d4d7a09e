-- geste schema, version 3 (SQLite): channels (ctx.subscribe / receive / publish / send_to).
--
-- geste_channel_messages: every published message, in publication order (seq). A message with a
-- target_instance_id was sent with send_to and is for that instance only. claimed_by is the instance
-- that took it, for the messages only one instance may take: direct ones and those taken by a competing
-- subscriber. Broadcast subscribers never claim: each keeps its own cursor.
-- geste_channel_subscriptions: one row per (channel, instance). cursor_seq: the instance takes messages
-- after it (set to the channel's last message when it subscribes, advanced by each message it takes).
-- waiting_since is set while the instance is suspended in receive() on this channel: a publish wakes it.
-- Messages nobody needs any more are deleted after App(message_retention=...); subscriptions of finished
-- instances are deleted by the same maintenance.

CREATE TABLE geste_channel_messages (
    seq                INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id         TEXT NOT NULL UNIQUE,
    channel            TEXT NOT NULL,
    data               TEXT NOT NULL,
    sender_instance_id TEXT,
    target_instance_id TEXT,
    created_at         REAL NOT NULL,
    claimed_by         TEXT
);
CREATE INDEX geste_channel_messages_by_channel ON geste_channel_messages (channel, seq);
CREATE INDEX geste_channel_messages_direct ON geste_channel_messages (target_instance_id, channel, seq)
    WHERE target_instance_id IS NOT NULL AND claimed_by IS NULL;

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

-- the retention of events deletes deliveries with their event
CREATE INDEX geste_event_deliveries_by_event ON geste_event_deliveries (event_seq);
