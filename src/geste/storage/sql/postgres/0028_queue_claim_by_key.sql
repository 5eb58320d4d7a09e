-- geste schema, version 28 (PostgreSQL): the queue claim finds the rows it admits by primary key only
-- (issue 19; docs/design.md "Queues"). Its admitting UPDATE repeated the waiting line's conditions
-- (queued_at IS NOT NULL AND status = 'pending'), which are the predicate of the partial indexes on that
-- line: right after a burst of starts, with statistics that still saw those indexes nearly empty, the
-- planner read the whole waiting line through one of them and filtered it by id (3,000 rows read to admit
-- 50 with a backlog of 3,050: 8 ms a claim instead of 2). Without a queue's partitions the rows are
-- already locked by the pick (FOR UPDATE SKIP LOCKED, which rechecks them), so the UPDATE needs their keys
-- alone; with partitions (picked without a lock) each pick is locked by key, where it is still queued,
-- through a lateral lookup of one row, which only the primary key serves.
CREATE OR REPLACE FUNCTION {schema}.geste_queue_claim(
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
    v_plimit integer;
    v_prate integer;
    v_busy integer;
    v_taken integer;
    v_n integer := p_n;
    v_key text;
    v_room integer;
    v_pstarts double precision[];
    v_keys text[] := ARRAY[]::text[];
    v_rooms integer[] := ARRAY[]::integer[];
    v_last_priority integer[];
    v_last_queued double precision[];
    v_last_id text[];
    v_ids text[] := ARRAY[]::text[];
    v_id text;
    v_priority integer;
    v_queued double precision;
    v_i integer;
    v_more boolean;
    v_wait double precision;
    v_counted record;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM {schema}.geste_instances AS i
                   WHERE i.queue = p_queue AND i.queued_at IS NOT NULL AND i.status = 'pending') THEN
        RETURN;
    END IF;
    SELECT q.concurrency, q.rate_limit, q.rate_period, q.partition_concurrency, q.partition_rate_limit
    INTO v_limit, v_rate, v_period, v_plimit, v_prate
    FROM {schema}.geste_queues AS q WHERE q.name = p_queue;
    IF v_limit IS NOT NULL OR v_rate IS NOT NULL THEN
        SELECT q.concurrency, q.rate_limit, q.rate_period, q.starts, q.partition_concurrency,
               q.partition_rate_limit
        INTO v_limit, v_rate, v_period, v_starts, v_plimit, v_prate
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
    IF v_plimit IS NULL AND v_prate IS NULL THEN
        RETURN QUERY
        UPDATE {schema}.geste_instances AS i
        SET locked_by = p_worker, lease_id = p_prefix || i.instance_id, lock_expires_at = p_expires,
            run_at = p_expires, status = 'running', queued_at = NULL, updated_at = p_now
        WHERE i.instance_id = ANY(ARRAY(
            SELECT w.instance_id FROM {schema}.geste_instances AS w
            WHERE w.queue = p_queue AND w.queued_at IS NOT NULL AND w.status = 'pending'
            ORDER BY w.queue, w.priority, w.queued_at
            LIMIT v_n
            FOR UPDATE SKIP LOCKED))  -- (28) locked, and so still queued: the rows by key alone
        RETURNING i.instance_id, i.lease_id, i.workflow_name, i.input, i.status, i.created_at,
                  i.cancel_requested, i.run, i.steps, i.deadline, NULL::double precision;
        GET DIAGNOSTICS v_taken = ROW_COUNT;
    ELSE
        -- the partitions holding queued work, in the order of their heads
        FOR v_key IN
            WITH RECURSIVE parts(k) AS (
                (SELECT w.partition_key FROM {schema}.geste_instances AS w
                 WHERE w.queue = p_queue AND w.queued_at IS NOT NULL AND w.status = 'pending'
                 ORDER BY w.partition_key LIMIT 1)
                UNION ALL
                SELECT (SELECT w.partition_key FROM {schema}.geste_instances AS w
                        WHERE w.queue = p_queue AND w.queued_at IS NOT NULL AND w.status = 'pending'
                          AND w.partition_key > parts.k
                        ORDER BY w.partition_key LIMIT 1)
                FROM parts WHERE parts.k IS NOT NULL
            )
            SELECT parts.k FROM parts
            CROSS JOIN LATERAL (
                SELECT w.priority, w.queued_at FROM {schema}.geste_instances AS w
                WHERE w.queue = p_queue AND w.partition_key = parts.k
                  AND w.queued_at IS NOT NULL AND w.status = 'pending'
                ORDER BY w.priority, w.queued_at LIMIT 1) AS head
            WHERE parts.k IS NOT NULL
            ORDER BY head.priority, head.queued_at, parts.k
        LOOP
            EXIT WHEN cardinality(v_keys) >= v_n;
            SELECT p.starts INTO v_pstarts FROM {schema}.geste_queue_partitions AS p
            WHERE p.queue = p_queue AND p.key = v_key FOR UPDATE SKIP LOCKED;
            IF NOT FOUND THEN  -- held by another claimer, or not made yet (an instance not started by
                INSERT INTO {schema}.geste_queue_partitions AS p (queue, key)  -- insert_queued): made here
                SELECT p_queue, v_key
                WHERE NOT EXISTS (SELECT 1 FROM {schema}.geste_queue_partitions AS p
                                  WHERE p.queue = p_queue AND p.key = v_key)
                ON CONFLICT DO NOTHING;
                SELECT p.starts INTO v_pstarts FROM {schema}.geste_queue_partitions AS p
                WHERE p.queue = p_queue AND p.key = v_key FOR UPDATE SKIP LOCKED;
                CONTINUE WHEN NOT FOUND;
            END IF;
            v_room := v_n;
            IF v_plimit IS NOT NULL THEN
                SELECT count(*) INTO v_busy FROM (
                    SELECT 1 FROM {schema}.geste_instances AS i
                    WHERE i.queue = p_queue AND i.partition_key = v_key AND i.queued_at IS NULL
                      AND i.status IN ('pending', 'running', 'waiting', 'compensating')
                    LIMIT v_plimit) AS x;
                v_room := least(v_room, v_plimit - v_busy);
            END IF;
            IF v_prate IS NOT NULL THEN
                v_pstarts := ARRAY(SELECT s FROM unnest(v_pstarts) AS s WHERE s > p_now - v_period ORDER BY s);
                IF cardinality(v_pstarts) >= v_prate THEN
                    v_wait := least(v_wait, v_pstarts[cardinality(v_pstarts) - v_prate + 1] + v_period);
                END IF;
                v_room := least(v_room, v_prate - cardinality(v_pstarts));
            END IF;
            IF v_room > 0 THEN
                v_keys := v_keys || v_key;
                v_rooms := v_rooms || v_room;
            END IF;
        END LOOP;
        -- turns: one instance of each partition with room left per turn, its next in its line's order
        v_last_priority := array_fill((-2147483648)::integer, ARRAY[cardinality(v_keys)]);
        v_last_queued := array_fill('-Infinity'::double precision, ARRAY[cardinality(v_keys)]);
        v_last_id := array_fill(''::text, ARRAY[cardinality(v_keys)]);
        v_more := cardinality(v_keys) > 0;
        WHILE v_more AND cardinality(v_ids) < v_n LOOP
            v_more := false;
            FOR v_i IN 1 .. cardinality(v_keys) LOOP
                EXIT WHEN cardinality(v_ids) >= v_n;
                CONTINUE WHEN v_rooms[v_i] <= 0;
                SELECT w.instance_id, w.priority, w.queued_at INTO v_id, v_priority, v_queued
                FROM {schema}.geste_instances AS w
                WHERE w.queue = p_queue AND w.partition_key = v_keys[v_i]
                  AND w.queued_at IS NOT NULL AND w.status = 'pending'
                  AND (w.priority, w.queued_at, w.instance_id)
                      > (v_last_priority[v_i], v_last_queued[v_i], v_last_id[v_i])
                ORDER BY w.priority, w.queued_at, w.instance_id LIMIT 1;
                IF NOT FOUND THEN
                    v_rooms[v_i] := 0;
                    CONTINUE;
                END IF;
                v_ids := v_ids || v_id;
                v_rooms[v_i] := v_rooms[v_i] - 1;
                v_last_priority[v_i] := v_priority;
                v_last_queued[v_i] := v_queued;
                v_last_id[v_i] := v_id;
                v_more := v_more OR v_rooms[v_i] > 0;
            END LOOP;
        END LOOP;
        RETURN QUERY
        UPDATE {schema}.geste_instances AS i
        SET locked_by = p_worker, lease_id = p_prefix || i.instance_id, lock_expires_at = p_expires,
            run_at = p_expires, status = 'running', queued_at = NULL, updated_at = p_now
        WHERE i.instance_id = ANY(ARRAY(  -- (28) each pick locked by key, if it is still queued
            SELECT w.instance_id FROM unnest(v_ids) AS v(id) CROSS JOIN LATERAL (
                SELECT w.instance_id FROM {schema}.geste_instances AS w
                WHERE w.instance_id = v.id AND w.queued_at IS NOT NULL AND w.status = 'pending'
                FOR UPDATE) AS w))
        RETURNING i.instance_id, i.lease_id, i.workflow_name, i.input, i.status, i.created_at,
                  i.cancel_requested, i.run, i.steps, i.deadline, NULL::double precision;
        GET DIAGNOSTICS v_taken = ROW_COUNT;
        IF v_prate IS NOT NULL AND v_taken > 0 THEN  -- each partition's window: its admissions now
            FOR v_counted IN
                SELECT i.partition_key AS k, count(*)::integer AS n FROM {schema}.geste_instances AS i
                WHERE i.instance_id = ANY(v_ids) AND i.lease_id = p_prefix || i.instance_id
                GROUP BY i.partition_key
            LOOP
                UPDATE {schema}.geste_queue_partitions AS p
                SET starts = ARRAY(SELECT s FROM unnest(p.starts) AS s WHERE s > p_now - v_period ORDER BY s)
                             || array_fill(p_now, ARRAY[v_counted.n])
                WHERE p.queue = p_queue AND p.key = v_counted.k
                RETURNING p.starts INTO v_pstarts;
                IF cardinality(v_pstarts) >= v_prate THEN
                    v_wait := least(v_wait, v_pstarts[cardinality(v_pstarts) - v_prate + 1] + v_period);
                END IF;
            END LOOP;
        END IF;
        IF v_wait IS NOT NULL AND v_taken < v_n AND v_rate IS NULL THEN
            RETURN QUERY SELECT NULL::text, NULL::text, NULL::text, NULL::text, NULL::text,
                                NULL::double precision, NULL::boolean, NULL::integer, NULL::integer,
                                NULL::double precision, v_wait;
        END IF;
    END IF;
    IF v_rate IS NOT NULL AND v_taken > 0 THEN
        v_starts := v_starts || array_fill(p_now, ARRAY[v_taken]);
        UPDATE {schema}.geste_queues AS q SET starts = v_starts WHERE q.name = p_queue;
    END IF;
    IF v_rate IS NOT NULL AND (cardinality(v_starts) >= v_rate OR (v_wait IS NOT NULL AND v_taken < v_n)) THEN
        RETURN QUERY SELECT NULL::text, NULL::text, NULL::text, NULL::text, NULL::text,
                            NULL::double precision, NULL::boolean, NULL::integer, NULL::integer,
                            NULL::double precision,
                            CASE WHEN cardinality(v_starts) >= v_rate
                                 THEN least(v_starts[cardinality(v_starts) - v_rate + 1] + v_period, v_wait)
                                 ELSE v_wait END;
    END IF;
END
$$;
