-- PLACEHOLDER of this branch (wt-cancel) only: version 16 belongs to another change of issue 18 (child
-- workflows), merged separately; at the merge, that migration replaces this file. It changes nothing.
SELECT 1;
