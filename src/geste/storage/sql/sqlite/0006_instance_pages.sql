-- geste schema, version 6 (SQLite): indexes for paging through instances by keyset, as the web viewer
-- does: newest first, ordered by (created_at, instance_id), filtered by workflow name, status, both or
-- neither, and by a created_at range. Each filter combination has an index whose equality columns come
-- first and whose last two columns are the sort key, so a page is one index range scan of `limit` rows,
-- however deep in the list it starts. The three single-filter indexes of version 1 are replaced by the
-- same ones with instance_id added (the tie-breaker of the sort); the workflow-and-status one is new.
DROP INDEX geste_instances_by_status;
DROP INDEX geste_instances_by_name;
DROP INDEX geste_instances_by_created;
CREATE INDEX geste_instances_by_status ON geste_instances (status, created_at, instance_id);
CREATE INDEX geste_instances_by_name ON geste_instances (workflow_name, created_at, instance_id);
CREATE INDEX geste_instances_by_created ON geste_instances (created_at, instance_id);
CREATE INDEX geste_instances_by_name_status ON geste_instances (workflow_name, status, created_at, instance_id);
