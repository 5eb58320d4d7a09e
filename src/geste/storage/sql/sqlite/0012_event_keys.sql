-- geste schema, version 12 (SQLite): events are matched by index (issue 15). A send finds the waits it may
-- wake, and a wait the events it may take, by match key (geste/_matching.py: a 64-bit hash of the event
-- type and one top-level key/value pair, canonical JSON), never by reading every wait or event of the type
-- (docs/design.md, "Events: matching by index").
--
-- An event is indexed under each of its top-level pairs: one geste_event_keys row per pair. A wait under
-- one key: one pair of its match, or its type's own key when it has no match (match_key).
--
-- Rows written before this version (or by a geste still running an older version) have no keys: events
-- with keyed = 0 are read by type, as before, through geste_events_unkeyed; waits with a NULL match_key
-- are found by type through geste_event_waits_unkeyed. Both partial indexes are empty once those rows
-- are gone.
CREATE TABLE geste_event_keys (
    match_key INTEGER NOT NULL,
    event_seq INTEGER NOT NULL,
    PRIMARY KEY (match_key, event_seq)
) WITHOUT ROWID;
-- the retention of events deletes their keys with them
CREATE INDEX geste_event_keys_by_event ON geste_event_keys (event_seq);

ALTER TABLE geste_events ADD COLUMN keyed INTEGER NOT NULL DEFAULT 0;
CREATE INDEX geste_events_unkeyed ON geste_events (event_type, seq) WHERE keyed = 0;

ALTER TABLE geste_event_waits ADD COLUMN match_key INTEGER;
DROP INDEX geste_event_waits_by_type;
CREATE INDEX geste_event_waits_by_key ON geste_event_waits (match_key);
CREATE INDEX geste_event_waits_unkeyed ON geste_event_waits (event_type) WHERE match_key IS NULL;
