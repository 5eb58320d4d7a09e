-- geste schema, version 16 (PostgreSQL): child workflows (issue 18; docs/child-workflows.md and
-- docs/design.md, "Child workflows"). parent_id: the instance whose ctx.start_child created this one (NULL:
-- started by a client). parent_close: what the parent's end does to it while it runs ('cancel', 'abandon',
-- 'wait'; 'cancelled' once the parent's end applied 'cancel'; NULL for an instance with no parent). Both
-- added without a table rewrite (no default).
-- geste_instances_by_parent: the children of an instance, oldest first (app.children, the parent's end
-- cancelling its children); partial, so the instances started by clients cost it nothing.
ALTER TABLE {schema}.geste_instances ADD COLUMN parent_id text;
ALTER TABLE {schema}.geste_instances ADD COLUMN parent_close text;
CREATE INDEX geste_instances_by_parent ON {schema}.geste_instances (parent_id, created_at, instance_id)
    WHERE parent_id IS NOT NULL;
