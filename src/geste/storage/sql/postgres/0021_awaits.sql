-- geste schema, version 21 (PostgreSQL): the child a parent awaits (issue 18; docs/design.md "Child
-- workflows"). awaits: the id of the child whose end the instance suspended to wait for, written by that
-- suspension (take_child_or_suspend) and left as it is afterwards (NULL: it never awaited one). A claim
-- joins it by primary key and returns the child's end with the claimed instance when the child has
-- ended, so that a parent woken by its child's end goes on without reading the child (one round trip
-- fewer on the path of a child's result). Not indexed (its writes stay HOT updates).
ALTER TABLE {schema}.geste_instances ADD COLUMN awaits text;

-- The awaited child's state in a fresh snapshot (a VOLATILE function's statement takes its own): the
-- suspension at a child wait (`suspend` with an awaited child) reads it through this after it has locked
-- the parent's row, in its one statement. A child's end that updated the parent's row committed before
-- that lock was granted, and so is seen here; one that has not reached the parent's row waits for the
-- suspension's commit and then wakes the parent. One statement instead of a transaction of four round
-- trips (BEGIN, suspend, read, COMMIT).
CREATE FUNCTION {schema}.geste_child_now(p_child text) RETURNS TABLE (
    workflow_name text, status text, result text, error text, parent_id text
)
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY SELECT i.workflow_name, i.status, i.result, i.error, i.parent_id
                 FROM {schema}.geste_instances AS i WHERE i.instance_id = p_child;
END
$$;
