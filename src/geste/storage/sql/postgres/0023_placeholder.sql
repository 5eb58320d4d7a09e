-- placeholder (the lead renumbers at merge)
SELECT 1;
