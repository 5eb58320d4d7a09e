-- geste schema, version 10 (SQLite): the outbox keeps each instance's order through dead events and
-- outages of any length, and tells how far behind it is.
-- status gains 'discarded': an operator gave the event up (app.discard_outbox_event); never sent again.
-- A dead event now holds the later events of its instance back, as a pending one does: the claim finds
-- the event of the instance just before a due one among the pending and the dead ones, through
-- geste_outbox_pending_by_instance and geste_outbox_dead_by_instance (which also counts the dead events).
-- A pending event waiting behind an earlier one may be "held": next_attempt_at NULL, out of the claims'
-- due range until the event before it is done (whoever ends that one makes it due).

-- "the dead event of this instance just before that one", and the count of dead events
CREATE INDEX geste_outbox_dead_by_instance ON geste_outbox (instance_id, step_seq) WHERE status = 'dead';
-- the oldest pending event (its age in geste status and the metrics)
CREATE INDEX geste_outbox_pending_by_created ON geste_outbox (created_at) WHERE status = 'pending';
