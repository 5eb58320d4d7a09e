-- geste schema, version 14: a placeholder, so that this branch's migration 15 loads (migrations are
-- numbered 1..n). Migration 14 belongs to another branch; this file is dropped when they merge.
SELECT 1;
