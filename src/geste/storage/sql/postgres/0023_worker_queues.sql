-- geste schema, version 23 (PostgreSQL): the registry lists the queues each worker serves (issue 19;
-- docs/design.md "Queues", "Routing queue wake-ups"). geste_workers.queues: their names, a JSON array
-- (sorted), NULL in rows written before. The listeners route a start onto a queue to one live worker
-- serving it, by rendezvous over this list (as instance wake-ups go over `workflows`): one claim per start,
-- not one per serving worker. A small table (the fleet): no index.
ALTER TABLE {schema}.geste_workers ADD COLUMN queues text;
