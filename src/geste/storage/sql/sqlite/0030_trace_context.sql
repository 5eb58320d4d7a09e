-- geste schema, version 30 (SQLite): tracing (docs/tracing.md). An instance records the W3C trace context
-- of the span that started it (its traceparent, and tracestate after a newline); NULL: started without
-- tracing. Read by primary key at the start of a run, only when tracing is on.
ALTER TABLE geste_instances ADD COLUMN trace_context TEXT;
