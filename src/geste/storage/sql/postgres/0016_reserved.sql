-- A placeholder, so that branch wt-beat (issue 18, heartbeats: migration 0018) numbers its migrations
-- 1..n on its own. Schema 16 belongs to another branch of issue 18 (child workflows, workflow
-- deadlines): DELETE THIS FILE when merging, the other branch's 0016_*.sql takes its place.
SELECT 1;
