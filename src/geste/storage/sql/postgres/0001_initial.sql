-- geste schema, version 1 (PostgreSQL). {schema} is the configured schema, quoted. Times are Unix
-- seconds (double precision) from the workers' clocks, as on SQLite.

CREATE TABLE {schema}.geste_meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);

CREATE TABLE {schema}.geste_instances (
    instance_id      text PRIMARY KEY,
    workflow_name    text NOT NULL,
    status           text NOT NULL,
    input            text NOT NULL,
    result           text,
    error            text,
    created_at       double precision NOT NULL,
    updated_at       double precision NOT NULL,
    finished_at      double precision,
    run_at           double precision,
    locked_by        text,
    lease_id         text,
    lock_expires_at  double precision,
    cancel_requested boolean NOT NULL DEFAULT false,
    steps            integer NOT NULL DEFAULT 0
) WITH (fillfactor = 80);
CREATE INDEX geste_instances_runnable ON {schema}.geste_instances (run_at) WHERE run_at IS NOT NULL;
CREATE INDEX geste_instances_by_status ON {schema}.geste_instances (status, created_at);
CREATE INDEX geste_instances_by_name ON {schema}.geste_instances (workflow_name, created_at);
CREATE INDEX geste_instances_by_created ON {schema}.geste_instances (created_at);

CREATE TABLE {schema}.geste_history (
    instance_id text NOT NULL,
    seq         integer NOT NULL,
    kind        text NOT NULL,
    name        text NOT NULL,
    payload     text,
    is_error    boolean NOT NULL DEFAULT false,
    created_at  double precision NOT NULL,
    PRIMARY KEY (instance_id, seq)
);

CREATE TABLE {schema}.geste_timers (
    instance_id text NOT NULL,
    seq         integer NOT NULL,
    expires_at  double precision NOT NULL,
    PRIMARY KEY (instance_id, seq)
);
CREATE INDEX geste_timers_due ON {schema}.geste_timers (expires_at);

CREATE TABLE {schema}.geste_event_waits (
    instance_id text PRIMARY KEY,
    event_type  text NOT NULL,
    match       text,
    since       double precision NOT NULL,
    deadline    double precision
);
CREATE INDEX geste_event_waits_by_type ON {schema}.geste_event_waits (event_type);

CREATE TABLE {schema}.geste_events (
    seq                bigserial PRIMARY KEY,
    event_id           text NOT NULL UNIQUE,
    event_type         text NOT NULL,
    source             text,
    data               text NOT NULL,
    extensions         text,
    target_instance_id text,
    created_at         double precision NOT NULL
);
CREATE INDEX geste_events_by_type ON {schema}.geste_events (event_type, created_at);

CREATE TABLE {schema}.geste_event_deliveries (
    instance_id text NOT NULL,
    event_seq   bigint NOT NULL,
    PRIMARY KEY (instance_id, event_seq)
);
