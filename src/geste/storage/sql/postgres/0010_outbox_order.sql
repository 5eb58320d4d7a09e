-- geste schema, version 10 (PostgreSQL): the outbox keeps each instance's order through dead events and
-- outages of any length, and tells how far behind it is.
-- status gains 'discarded': an operator gave the event up (app.discard_outbox_event); never sent again.
-- A dead event now holds the later events of its instance back, as a pending one does: the claim finds
-- the event of the instance just before a due one among the pending and the dead ones, through
-- geste_outbox_pending_by_instance and geste_outbox_dead_by_instance (which also counts the dead events).
-- A pending event waiting behind an earlier one may be "held": next_attempt_at NULL, out of the claims'
-- due range until the event before it is done (whoever ends that one makes it due).
-- geste_outbox_pending_by_created: the oldest pending event, whose age geste status and the metrics show.

CREATE INDEX geste_outbox_dead_by_instance ON {schema}.geste_outbox (instance_id, step_seq)
    WHERE status = 'dead';
CREATE INDEX geste_outbox_pending_by_created ON {schema}.geste_outbox (created_at)
    WHERE status = 'pending';
