-- geste schema, version 27 (SQLite): versions (issue 20; docs/versioning.md, docs/design.md "Versions").
-- An instance records the version of the code it started on and whether its workflow is pinned to it;
-- runner (a virtual generated column: nothing stored) is, for a pinned instance, its workflow's name and
-- its version separated by U+001F, NULL for the others. A claim matches coalesce(runner, workflow_name),
-- the key of the claim indexes.
ALTER TABLE geste_instances ADD COLUMN version TEXT;
ALTER TABLE geste_instances ADD COLUMN pinned INTEGER NOT NULL DEFAULT 0;
ALTER TABLE geste_instances ADD COLUMN runner TEXT GENERATED ALWAYS AS (
    CASE WHEN pinned THEN workflow_name || char(29) || coalesce(version, '') END
) VIRTUAL;
ALTER TABLE geste_workers ADD COLUMN version TEXT;

DROP INDEX geste_instances_runnable_by_name;
DROP INDEX geste_instances_leased_by_name;
CREATE INDEX geste_instances_runnable_by_name ON geste_instances (coalesce(runner, workflow_name), run_at)
    WHERE run_at IS NOT NULL AND lease_id IS NULL
      AND status IN ('pending', 'running', 'waiting', 'compensating');
CREATE INDEX geste_instances_leased_by_name ON geste_instances (coalesce(runner, workflow_name), run_at)
    WHERE lease_id IS NOT NULL AND status IN ('pending', 'running', 'waiting', 'compensating');

-- the patch markers (ctx.patched, StepKind 'patch') of the histories, by patch id: what `geste patches`
-- reads (only those rows are in it; any other row's insert only tests the predicate)
CREATE INDEX geste_history_patches ON geste_history (name, instance_id) WHERE kind = 'patch';
