-- geste schema, version 8: RESERVED for a change being made on another branch at the same time.
-- This file only keeps the numbering contiguous (the loader requires 1..n) so that version 9 can be
-- written and tested here. It changes nothing. When the real 0008 is merged, delete this file: two
-- 0008 files stop geste at import ("migrations ... are not numbered 1..n"), so it cannot be forgotten.
SELECT 1;
