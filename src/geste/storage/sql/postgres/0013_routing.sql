-- geste schema, version 13 (PostgreSQL): wake-ups routed to one worker, not to all (issue 15).
-- last_worker: the worker that last ran the instance, set when it suspends or gives its lease back. A
-- notification that makes the instance runnable names it ("worker"), and that worker alone claims the
-- instance, by id; the others act only when it is not alive or full (docs/design.md, "Wake-ups").
-- No index: nothing looks an instance up by it; a suspension writes it in the same row update.
-- geste_workers.relay: whether the worker runs an outbox relay, so that geste_outbox_pending goes to
-- one relay, not to every worker.
ALTER TABLE {schema}.geste_instances ADD COLUMN last_worker text;
ALTER TABLE {schema}.geste_workers ADD COLUMN relay boolean NOT NULL DEFAULT false;
