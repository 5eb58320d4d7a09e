-- Placeholder for migration 21, which another branch adds: the migrations must be numbered 1..n, and this
-- branch's partitions are 22. Drop this file when merging that branch's 0021.
SELECT 1;
