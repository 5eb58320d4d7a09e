-- geste schema, version 11: RESERVED for another branch's migration (issue 15, the claims and chores).
-- This branch (wt-events) only needs the numbers to run 1..n for its 0012; drop this file at the merge.
SELECT 1;  -- a statement: an empty script is not a query to asyncpg
