-- geste schema, version 4 (SQLite): the transactional outbox. One row per event a workflow emitted with
-- ctx.send_event, inserted in the transaction that records the step, then delivered by a relay.
-- status: pending (to deliver; next_attempt_at says when), delivered, dead (gave up after N attempts).
-- A relay claims a row with a lease (claim_id, claim_expires_at); attempts counts the claims.
-- Per instance only the pending row of lowest step_seq can be claimed: events go out in order.

CREATE TABLE geste_outbox (
    event_id         TEXT PRIMARY KEY,
    instance_id      TEXT NOT NULL,
    step_seq         INTEGER NOT NULL,      -- the history seq of the send_event step
    event_type       TEXT NOT NULL,
    source           TEXT NOT NULL,
    subject          TEXT,
    data             TEXT,                  -- JSON text; NULL: no data
    status           TEXT NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  REAL,                  -- pending rows only
    last_error       TEXT,
    created_at       REAL NOT NULL,
    updated_at       REAL NOT NULL,
    delivered_at     REAL,
    claimed_by       TEXT,
    claim_id         TEXT,
    claim_expires_at REAL
) WITHOUT ROWID;
-- claims and the relay's next wake-up read the pending rows only
CREATE INDEX geste_outbox_due ON geste_outbox (next_attempt_at) WHERE status = 'pending';
-- "no earlier pending event of this instance": the per-instance order
CREATE INDEX geste_outbox_pending_by_instance ON geste_outbox (instance_id, step_seq)
    WHERE status = 'pending';
-- the operator's listing, newest first
CREATE INDEX geste_outbox_by_created ON geste_outbox (created_at);
