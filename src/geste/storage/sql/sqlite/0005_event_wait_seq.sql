-- geste schema, version 5 (SQLite): an event wait knows the history position of its outcome, so that
-- send_event can write the event straight into a waiting instance's history (one commit fewer and no
-- event-taking transaction on the woken worker's path).
ALTER TABLE geste_event_waits ADD COLUMN outcome_seq INTEGER;
