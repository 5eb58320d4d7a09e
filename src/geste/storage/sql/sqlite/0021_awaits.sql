-- geste schema, version 21 (SQLite): the child a parent awaits (issue 18; docs/design.md "Child
-- workflows"). awaits: the id of the child whose end the instance suspended to wait for, written by that
-- suspension (take_child_or_suspend) and left as it is afterwards (NULL: it never awaited one). A claim
-- returns the child's end with the claimed instance when the child has ended, so that a parent woken by
-- its child's end goes on without reading the child. Not indexed: read and written by primary key only.
ALTER TABLE geste_instances ADD COLUMN awaits TEXT;
