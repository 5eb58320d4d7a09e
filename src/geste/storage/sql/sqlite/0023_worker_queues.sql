-- geste schema, version 23 (SQLite): the registry lists the queues each worker serves (issue 19;
-- docs/design.md "Queues", "Routing queue wake-ups"). geste_workers.queues: their names, a JSON array
-- (sorted), NULL in rows written before. SQLite has no notifications (nothing is routed): the column is
-- kept in step with PostgreSQL's, for the registry's readers.
ALTER TABLE geste_workers ADD COLUMN queues TEXT;
