-- geste schema, version 17 (SQLite): workflow deadlines (issue 18). deadline: when the instance is
-- cancelled for its deadline (start(..., timeout=...) or deadline=...; NULL: none). A suspension's run_at
-- is the earlier of its own and the deadline, so a waiting instance becomes due at its deadline.
ALTER TABLE geste_instances ADD COLUMN deadline REAL;
