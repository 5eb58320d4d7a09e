-- Placeholder for migration 23, which another branch adds: the migrations must be numbered 1..n, and this
-- branch's schedules onto queues are 24. Drop this file when merging that branch's 0023.
SELECT 1;
