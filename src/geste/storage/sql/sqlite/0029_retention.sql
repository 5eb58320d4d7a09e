-- geste schema, version 29 (SQLite): the retention of finished instances (issue 21; docs/retention.md,
-- docs/design.md "Retention of finished instances"). The retention walks the finished instances in the
-- order they ended (geste_instances_finished: the finished rows only, so it reads no running one) and
-- deletes each with its rows, the delivered or discarded events of its outbox among them
-- (geste_outbox_done_by_instance: the outbox had no index by instance for those).
CREATE INDEX geste_instances_finished ON geste_instances (finished_at, instance_id)
    WHERE status IN ('completed', 'failed', 'cancelled');
CREATE INDEX geste_outbox_done_by_instance ON geste_outbox (instance_id)
    WHERE status IN ('delivered', 'discarded');
