-- geste schema, version 4 (PostgreSQL): the transactional outbox. One row per event a workflow emitted with
-- ctx.send_event, inserted by the statement that records the step, then delivered by a relay.
-- status: pending (to deliver; next_attempt_at says when), delivered, dead (gave up after N attempts).
-- A relay claims a row with a lease (claim_id, claim_expires_at; FOR UPDATE SKIP LOCKED); attempts
-- counts the claims. Per instance only the pending row of lowest step_seq can be claimed: events go out
-- in order. Rows change a few times each (claim, mark): room is left on each page (fillfactor 70).

CREATE TABLE {schema}.geste_outbox (
    event_id         text PRIMARY KEY,
    instance_id      text NOT NULL,
    step_seq         integer NOT NULL,
    event_type       text NOT NULL,
    source           text NOT NULL,
    subject          text,
    data             text,
    status           text NOT NULL,
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  double precision,
    last_error       text,
    created_at       double precision NOT NULL,
    updated_at       double precision NOT NULL,
    delivered_at     double precision,
    claimed_by       text,
    claim_id         text,
    claim_expires_at double precision
) WITH (fillfactor = 70);
CREATE INDEX geste_outbox_due ON {schema}.geste_outbox (next_attempt_at) WHERE status = 'pending';
CREATE INDEX geste_outbox_pending_by_instance ON {schema}.geste_outbox (instance_id, step_seq)
    WHERE status = 'pending';
CREATE INDEX geste_outbox_by_created ON {schema}.geste_outbox (created_at);
