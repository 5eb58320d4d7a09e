-- geste schema, version 27 (PostgreSQL): versions (issue 20; docs/versioning.md, docs/design.md
-- "Versions"). An instance records the version of the code it started on (the starting App's version)
-- and whether its workflow is pinned to it. runner is set for a pinned instance only: its workflow's name
-- and its version, separated by U+001F (which no registered workflow name or version holds); NULL for the
-- others (a NULL takes no room in the row: a stored copy of every name made the rows wider, enough to
-- change other plans). What a claim matches is coalesce(runner, workflow_name): the name, or the name
-- and the pinned version. The claim indexes are keyed on that expression instead of the name: a worker
-- claims its workflows' names, and its pinned workflows' names with its own version, and reads the
-- ranges of those keys only, never a pinned instance of another version. A generated column: right
-- whatever statement writes the row (adding it to existing rows, all NULL, rewrites the table once).
ALTER TABLE {schema}.geste_instances
    ADD COLUMN version text,
    ADD COLUMN pinned boolean NOT NULL DEFAULT false,
    ADD COLUMN runner text GENERATED ALWAYS AS (
        CASE WHEN pinned THEN workflow_name || chr(29) || coalesce(version, '') END
    ) STORED;
ALTER TABLE {schema}.geste_workers ADD COLUMN version text;

DROP INDEX {schema}.geste_instances_runnable_by_name;
DROP INDEX {schema}.geste_instances_leased_by_name;
CREATE INDEX geste_instances_runnable_by_name
    ON {schema}.geste_instances ((coalesce(runner, workflow_name)), run_at)
    WHERE run_at IS NOT NULL AND lease_id IS NULL
      AND status IN ('pending', 'running', 'waiting', 'compensating');
CREATE INDEX geste_instances_leased_by_name
    ON {schema}.geste_instances ((coalesce(runner, workflow_name)), run_at)
    WHERE lease_id IS NOT NULL AND status IN ('pending', 'running', 'waiting', 'compensating');

-- the patch markers (ctx.patched, StepKind 'patch') of the histories, by patch id: what `geste patches`
-- reads (only those rows are in it; any other row's insert only tests the predicate)
CREATE INDEX geste_history_patches ON {schema}.geste_history (name, instance_id) WHERE kind = 'patch';
