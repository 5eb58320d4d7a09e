-- geste schema, version 30 (PostgreSQL): tracing (docs/tracing.md). An instance records the W3C trace
-- context (its traceparent, and tracestate after a newline when there is one) of the span that started
-- it: every run, activity attempt and wait of it, on any worker and after any resume, is a span of that
-- trace. NULL when it was started without tracing (opentelemetry absent or not configured). Read by
-- primary key at the start of a run, only when tracing is on (the claims do not read it).
ALTER TABLE {schema}.geste_instances ADD COLUMN trace_context text;
