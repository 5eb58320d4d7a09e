-- geste schema, version 17 (PostgreSQL): workflow deadlines (issue 18). deadline: when the instance is
-- cancelled for its deadline (start(..., timeout=...) or deadline=...; NULL: none). A suspension's run_at
-- is the earlier of its own and the deadline, so a waiting instance becomes due at its deadline (a durable
-- timer, no poll); the worker running it keeps a local timer. Added without a table rewrite (no default).
ALTER TABLE {schema}.geste_instances ADD COLUMN deadline double precision;
