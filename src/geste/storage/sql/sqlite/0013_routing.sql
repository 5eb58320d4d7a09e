-- geste schema, version 13 (SQLite): the columns of wake-up routing (issue 15). SQLite has no
-- LISTEN/NOTIFY: its workers poll as before; the columns are kept so that both backends hold the same
-- rows (last_worker: the worker that last ran the instance; relay: the worker runs an outbox relay).
ALTER TABLE geste_instances ADD COLUMN last_worker TEXT;
ALTER TABLE geste_workers ADD COLUMN relay INTEGER NOT NULL DEFAULT 0;
