-- geste schema, version 7 (PostgreSQL): the audit trail of operator retries (app.retry, `geste retry`),
-- and each worker's lock_timeout in the registry.
-- A retry of a failed instance removes the history rows of the steps that run again (the activity whose
-- last attempt failed at the end of the history, with its gather) and clears the instance's error; this table
-- keeps what it removed and what it cleared, one row per retry, so the story of the instance is never
-- lost: `removed` holds the rows as JSON [[seq, kind, name, payload, is_error, created_at], ...].

CREATE TABLE {schema}.geste_retries (
    instance_id text NOT NULL,
    retry       integer NOT NULL,            -- 1 for the first retry of the instance, then 2, ...
    retried_at  double precision NOT NULL,
    from_seq    integer NOT NULL,            -- the first step run again: the rows from it on were removed
    error       text,                        -- the error the instance had failed with (JSON)
    failed_at   double precision,            -- when it had failed (its finished_at)
    removed     text NOT NULL,               -- the removed history rows (JSON)
    PRIMARY KEY (instance_id, retry)
);

-- A worker's own lock_timeout (it heartbeats every third of it): a reader judges it alive by the longer
-- of its own and the worker's, so a worker with long leases is not called stale, nor its lease broken by
-- `geste resume`, between two of its heartbeats. NULL for rows written before this version.
ALTER TABLE {schema}.geste_workers ADD COLUMN lock_timeout double precision;
