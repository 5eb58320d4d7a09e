-- geste schema, version 18 (PostgreSQL): activity heartbeats (issue 18). heartbeats: the last details each
-- running activity of the instance gave ctx.heartbeat(...), a JSON object keyed by the step's key
-- (``<run>.<seq>``), written by the worker's lease renewal (only when new details were given since the
-- last one) and read by the first attempt of an activity with a heartbeat_timeout after a crash. NULL:
-- no details. Not indexed (its writes stay HOT updates): read and written by primary key only.
ALTER TABLE {schema}.geste_instances ADD COLUMN heartbeats text;
