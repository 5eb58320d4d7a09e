-- geste schema, version 20 (PostgreSQL): queues (issue 19; docs/design.md "Queues"). An instance started
-- onto a queue waits, queued (queued_at set, run_at NULL: outside both claim indexes), until a claim of
-- the queue admits it (queued_at NULL, claimed in the same update); admitted and unfinished, it holds one
-- of the queue's slots. geste_queues holds each declared queue's limits, and is the row the claims of a
-- limited queue take turns on (geste_queue_claim). Every index below is partial and holds queue rows
-- only: an instance outside any queue writes no entry, and its updates that were HOT stay HOT.
ALTER TABLE {schema}.geste_instances
    ADD COLUMN queue text,
    ADD COLUMN priority integer NOT NULL DEFAULT 0,
    ADD COLUMN queued_at double precision,
    ADD COLUMN dedup_id text;

CREATE TABLE {schema}.geste_queues (
    name               text PRIMARY KEY,
    concurrency        integer,
    worker_concurrency integer,
    rate_limit         integer,
    rate_period        double precision,
    starts             double precision[] NOT NULL DEFAULT ARRAY[]::double precision[],
    updated_at         double precision NOT NULL
);

-- the waiting line of a queue, in claim order (priority, then first come first served)
CREATE INDEX geste_instances_queued ON {schema}.geste_instances (queue, priority, queued_at)
    WHERE queued_at IS NOT NULL AND status = 'pending';
-- the slots in use: admitted and unfinished (an end, whatever its path, changes the status)
CREATE INDEX geste_instances_queue_admitted ON {schema}.geste_instances (queue)
    WHERE queue IS NOT NULL AND queued_at IS NULL
      AND status IN ('pending', 'running', 'waiting', 'compensating');
-- at most one unfinished instance per dedup id and queue
CREATE UNIQUE INDEX geste_instances_dedup ON {schema}.geste_instances (queue, dedup_id)
    WHERE dedup_id IS NOT NULL AND status IN ('pending', 'running', 'waiting', 'compensating');

-- The claim of a queue: at most n of its waiting line, admitted and claimed, within its global limit and
-- its rate (rate_limit admissions in any window of rate_period seconds: starts holds the admission times
-- of the last window, under the same lock). One plpgsql function so that each statement takes a fresh
-- snapshot (READ COMMITTED, VOLATILE): the count of the slots in use runs after the queue's row lock is
-- held, so it sees every admission committed by the claimer it waited for (one statement would count as
-- of its own start, before the lock, and admit as many again). Without a limit or a rate, no lock: SKIP
-- LOCKED keeps concurrent claimers apart, as in `claim`. An empty line returns before any lock (an idle
-- queue costs one index probe). Rate-bound, one more row, with a NULL instance_id: run_at, when the
-- window has room again (the worker wakes then).
CREATE FUNCTION {schema}.geste_queue_claim(
    p_queue text, p_n integer, p_worker text, p_prefix text, p_now double precision,
    p_expires double precision
) RETURNS TABLE (
    instance_id text, lease_id text, workflow_name text, input text, status text,
    created_at double precision, cancel_requested boolean, run integer, steps integer,
    deadline double precision, run_at double precision
)
LANGUAGE plpgsql VOLATILE AS $$
#variable_conflict use_column
DECLARE
    v_limit integer;
    v_rate integer;
    v_period double precision;
    v_starts double precision[];
    v_busy integer;
    v_taken integer;
    v_n integer := p_n;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM {schema}.geste_instances AS i
                   WHERE i.queue = p_queue AND i.queued_at IS NOT NULL AND i.status = 'pending') THEN
        RETURN;
    END IF;
    SELECT q.concurrency, q.rate_limit INTO v_limit, v_rate FROM {schema}.geste_queues AS q
    WHERE q.name = p_queue;
    IF v_limit IS NOT NULL OR v_rate IS NOT NULL THEN
        SELECT q.concurrency, q.rate_limit, q.rate_period, q.starts INTO v_limit, v_rate, v_period, v_starts
        FROM {schema}.geste_queues AS q WHERE q.name = p_queue FOR UPDATE;
    END IF;
    IF v_limit IS NOT NULL THEN
        SELECT count(*) INTO v_busy FROM (
            SELECT 1 FROM {schema}.geste_instances AS i
            WHERE i.queue = p_queue AND i.queued_at IS NULL
              AND i.status IN ('pending', 'running', 'waiting', 'compensating')
            LIMIT v_limit) AS x;
        v_n := least(v_n, v_limit - v_busy);
    END IF;
    IF v_rate IS NOT NULL THEN
        v_starts := ARRAY(SELECT s FROM unnest(v_starts) AS s WHERE s > p_now - v_period ORDER BY s);
        IF cardinality(v_starts) >= v_rate THEN
            RETURN QUERY SELECT NULL::text, NULL::text, NULL::text, NULL::text, NULL::text,
                                NULL::double precision, NULL::boolean, NULL::integer, NULL::integer,
                                NULL::double precision,
                                v_starts[cardinality(v_starts) - v_rate + 1] + v_period;
            RETURN;
        END IF;
        v_n := least(v_n, v_rate - cardinality(v_starts));
    END IF;
    IF v_n <= 0 THEN
        RETURN;
    END IF;
    RETURN QUERY
    UPDATE {schema}.geste_instances AS i
    SET locked_by = p_worker, lease_id = p_prefix || i.instance_id, lock_expires_at = p_expires,
        run_at = p_expires, status = 'running', queued_at = NULL, updated_at = p_now
    WHERE i.instance_id = ANY(ARRAY(
        SELECT w.instance_id FROM {schema}.geste_instances AS w
        WHERE w.queue = p_queue AND w.queued_at IS NOT NULL AND w.status = 'pending'
        ORDER BY w.queue, w.priority, w.queued_at
        LIMIT v_n
        FOR UPDATE SKIP LOCKED))
      AND i.queued_at IS NOT NULL AND i.status = 'pending'
    RETURNING i.instance_id, i.lease_id, i.workflow_name, i.input, i.status, i.created_at,
              i.cancel_requested, i.run, i.steps, i.deadline, NULL::double precision;
    GET DIAGNOSTICS v_taken = ROW_COUNT;
    IF v_rate IS NOT NULL AND v_taken > 0 THEN
        v_starts := v_starts || array_fill(p_now, ARRAY[v_taken]);
        UPDATE {schema}.geste_queues AS q SET starts = v_starts WHERE q.name = p_queue;
        IF cardinality(v_starts) >= v_rate THEN
            RETURN QUERY SELECT NULL::text, NULL::text, NULL::text, NULL::text, NULL::text,
                                NULL::double precision, NULL::boolean, NULL::integer, NULL::integer,
                                NULL::double precision,
                                v_starts[cardinality(v_starts) - v_rate + 1] + v_period;
        END IF;
    END IF;
END
$$;
