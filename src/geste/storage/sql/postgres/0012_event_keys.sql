-- geste schema, version 12 (PostgreSQL): events are matched by index (issue 15). A send finds the waits
-- it may wake, and a wait the events it may take, by match key (geste/_matching.py: a 64-bit hash of the
-- event type and one top-level key/value pair, canonical JSON), never by reading every wait or event of
-- the type. The per-type advisory lock that serialised every sender and waiter of a type gives way to a
-- lock per match key (docs/design.md, "Events: matching by index").
--
-- An event is indexed under each of its top-level pairs: one geste_event_keys row per pair. A wait under
-- one key: one pair of its match, or its type's own key when it has no match (match_key), and it keeps
-- the canonical texts of all its pairs (match_pairs), which an event must all have.
--
-- Rows written before this version (or by a geste still running an older version) have no keys: events
-- with keyed = false are read by type, as before, through geste_events_unkeyed; waits with a NULL
-- match_key are found by type through geste_event_waits_unkeyed and woken, to look for their event
-- themselves (their next wait is keyed). Both partial indexes are empty once those rows are gone.
CREATE TABLE {schema}.geste_event_keys (
    match_key bigint NOT NULL,
    event_seq bigint NOT NULL,
    PRIMARY KEY (match_key, event_seq)
);
-- the retention of events deletes their keys with them
CREATE INDEX geste_event_keys_by_event ON {schema}.geste_event_keys (event_seq);

ALTER TABLE {schema}.geste_events ADD COLUMN keyed boolean NOT NULL DEFAULT false;
CREATE INDEX geste_events_unkeyed ON {schema}.geste_events (event_type, seq) WHERE NOT keyed;

ALTER TABLE {schema}.geste_event_waits ADD COLUMN match_key bigint;
ALTER TABLE {schema}.geste_event_waits ADD COLUMN match_pairs text[];
DROP INDEX {schema}.geste_event_waits_by_type;
CREATE INDEX geste_event_waits_by_key ON {schema}.geste_event_waits (match_key);
CREATE INDEX geste_event_waits_unkeyed ON {schema}.geste_event_waits (event_type) WHERE match_key IS NULL;
