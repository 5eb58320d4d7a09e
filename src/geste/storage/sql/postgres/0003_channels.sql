-- geste schema, version 3 (PostgreSQL): channels (ctx.subscribe / receive / publish / send_to).
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

CREATE TABLE {schema}.geste_channel_messages (
    seq                bigserial PRIMARY KEY,
    message_id         text NOT NULL UNIQUE,
    channel            text NOT NULL,
    data               text NOT NULL,
    sender_instance_id text,
    target_instance_id text,
    created_at         double precision NOT NULL,
    claimed_by         text
);
CREATE INDEX geste_channel_messages_by_channel ON {schema}.geste_channel_messages (channel, seq);
CREATE INDEX geste_channel_messages_direct ON {schema}.geste_channel_messages (target_instance_id, channel, seq)
    WHERE target_instance_id IS NOT NULL AND claimed_by IS NULL;

CREATE TABLE {schema}.geste_channel_subscriptions (
    channel       text NOT NULL,
    instance_id   text NOT NULL,
    mode          text NOT NULL,          -- 'broadcast' or 'competing'
    cursor_seq    bigint NOT NULL,
    waiting_since double precision,
    created_at    double precision NOT NULL,
    PRIMARY KEY (channel, instance_id)
);
CREATE INDEX geste_channel_subscriptions_by_instance ON {schema}.geste_channel_subscriptions (instance_id);
CREATE INDEX geste_channel_subscriptions_waiting ON {schema}.geste_channel_subscriptions (channel, mode, waiting_since)
    WHERE waiting_since IS NOT NULL;

-- the retention of events deletes deliveries with their event
CREATE INDEX geste_event_deliveries_by_event ON {schema}.geste_event_deliveries (event_seq);
