-- geste schema, version 8 (SQLite): which events an instance sees is decided by the database, not by
-- comparing two hosts' clocks. An instance sees the events whose seq is above its event_floor, the last
-- seq given to an event when the instance was created (sqlite_sequence: AUTOINCREMENT never reuses one),
-- so every event stored after it is visible and none stored before, whatever the clocks of the starter
-- and the sender say. A registered wait keeps the floor (after_seq), so send_event compares numbers too.
ALTER TABLE geste_instances ADD COLUMN event_floor INTEGER;
ALTER TABLE geste_event_waits ADD COLUMN after_seq INTEGER;

-- The instances that may still wait (not completed or cancelled: a failed one may be retried) get the
-- floor that best keeps what they saw before, by the old rule: the highest seq of the events sent
-- before they were created (by created_at). One sort of both tables, not a query per instance.
WITH points AS (
    SELECT created_at, 0 AS k, instance_id, NULL AS seq
    FROM geste_instances WHERE status NOT IN ('completed', 'cancelled')
    UNION ALL
    SELECT created_at, 1, NULL, seq FROM geste_events
), floors AS (
    SELECT instance_id, max(seq) OVER (ORDER BY created_at, k ROWS UNBOUNDED PRECEDING) AS floor
    FROM points
)
UPDATE geste_instances SET event_floor = coalesce(floors.floor, 0)
FROM floors
WHERE floors.instance_id = geste_instances.instance_id;

UPDATE geste_event_waits
SET after_seq = (SELECT i.event_floor FROM geste_instances i WHERE i.instance_id = geste_event_waits.instance_id);

-- The events an instance may take are read by type in seq order from its floor on.
DROP INDEX geste_events_by_type;
CREATE INDEX geste_events_by_type ON geste_events (event_type, seq);
