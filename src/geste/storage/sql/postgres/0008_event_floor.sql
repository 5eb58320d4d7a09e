-- geste schema, version 8 (PostgreSQL): which events an instance sees is decided by the database, not by
-- comparing two hosts' clocks. An instance sees the events whose seq is above its event_floor, a value of
-- the events' own sequence drawn when the instance was created: every event that draws its seq after
-- that moment is visible, every one drawn before is not, whatever the clocks of the starter and the
-- sender say. A registered wait keeps the floor (after_seq), so send_event compares numbers too.
ALTER TABLE {schema}.geste_instances ADD COLUMN event_floor bigint;
ALTER TABLE {schema}.geste_event_waits ADD COLUMN after_seq bigint;

-- The instances that may still wait (not completed or cancelled: a failed one may be retried) get the
-- floor that best keeps what they saw before, by the old rule: the highest seq of the events sent
-- before they were created (by created_at). One sort of both tables, not a query per instance.
WITH points AS (
    SELECT created_at, 0 AS k, instance_id, NULL::bigint AS seq
    FROM {schema}.geste_instances WHERE status NOT IN ('completed', 'cancelled')
    UNION ALL
    SELECT created_at, 1, NULL, seq FROM {schema}.geste_events
), floors AS (
    SELECT instance_id, max(seq) OVER (ORDER BY created_at, k ROWS UNBOUNDED PRECEDING) AS floor
    FROM points
)
UPDATE {schema}.geste_instances AS i SET event_floor = coalesce(floors.floor, 0)
FROM floors
WHERE floors.instance_id = i.instance_id;

UPDATE {schema}.geste_event_waits AS w SET after_seq = i.event_floor
FROM {schema}.geste_instances AS i
WHERE i.instance_id = w.instance_id;

-- The events an instance may take are read by type in seq order from its floor on.
DROP INDEX {schema}.geste_events_by_type;
CREATE INDEX geste_events_by_type ON {schema}.geste_events (event_type, seq);
