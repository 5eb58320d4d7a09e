-- Placeholder for migration 22, which another branch adds (queue partitions): the migrations must be numbered
-- 1..n, and this branch's worker queues are 23. Drop this file when merging that branch's 0022.
SELECT 1;
