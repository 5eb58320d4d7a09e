"""Events matched by index (issue 15): one rule on both backends, every send and wait by key, no lost
wake-up without a lock per event type.

- The rule (``geste._matching``): top-level keys equal as JSON values; ``1`` equals ``1.0``, ``true`` is not
  ``1``. Checked in Python and end to end on both backends, with the event sent before the wait (the
  wait's lookup) and after it (the send's).
- The index: a send reads the waits of its keys only, a wait the events of its key only: ``EXPLAIN
  ANALYZE`` of the real statements over 100,000 waits and 100,000 events of one type (PostgreSQL, custom
  and generic plans), ``EXPLAIN QUERY PLAN`` and VM steps on SQLite.
- The locks (PostgreSQL): a wait holds its own key; a send of another key of the same type goes through
  while it does, a send of that key waits for it. Two sends racing for one waiting instance: one hands
  it its event, the other's is kept for the next wait.
- The race: two processes send events and run waiters of one type at the same time; every event reaches
  every instance it matches exactly once.
- What older versions wrote: waits keyed by the migration, events without keys read by type, a wait
  without a key (an older geste still running) woken to look for itself.

Every wait is for a condition (a status, a row, a lock seen waiting in ``pg_stat_activity``, a result)
with a deadline: never a sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

import geste
from geste import _matching
from geste._matching import canonical, event_keys, matches, pair_text, wait_key
from geste.storage.base import NewEvent

from .processes import start_process
from .support import database_at_version, raw_query, vm_steps, wait_status, wait_until

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # so that `tests.apps` is importable however pytest was started
    sys.path.insert(0, str(ROOT))


MakeApp = Callable[..., geste.App]

# -- the rule --------------------------------------------------------------------------------------------
RULE_CASES: list[tuple[Any, Any, bool]] = [
    # (match, event data, accepted)
    ({"n": 1}, {"n": 1.0}, True),
    ({"n": 1.0}, {"n": 1}, True),
    ({"n": -0.0}, {"n": 0}, True),
    ({"n": 2**70}, {"n": float(2**70)}, True),  # exactly the same number
    ({"n": 10**16 + 1}, {"n": 1e16}, False),  # integers exactly: 1e16 is 10**16
    ({"n": 0.5}, {"n": 0.5}, True),
    ({"n": 1}, {"n": True}, False),  # Python's == said equal: JSON's types differ
    ({"n": True}, {"n": 1}, False),
    ({"n": 0}, {"n": False}, False),
    ({"n": False}, {"n": False}, True),
    ({"n": "1"}, {"n": 1}, False),
    ({"n": None}, {"n": None}, True),
    ({"n": None}, {"m": None}, False),  # a missing key is not null
    ({"o": {"a": 1, "b": [1, 2.0]}}, {"o": {"b": [1.0, 2], "a": 1.0}}, True),  # key order, 2.0 == 2
    ({"o": {"a": 1}}, {"o": {"a": 1, "b": 2}}, False),  # equality, not containment
    ({"l": [1, 2]}, {"l": [2, 1]}, False),
    ({"l": [1]}, {"l": [True]}, False),
    ({"s": "é"}, {"s": "é"}, True),
    ({"s": "é"}, {"s": "e\u0301"}, False),  # code points, no normalisation
    ({"a": 1, "b": "x"}, {"b": "x", "a": 1, "c": [3]}, True),  # every pair of the match, others ignored
    ({"a": 1, "b": "x"}, {"a": 1, "b": "y"}, False),
    ({"flag": True, "id": "o-1"}, {"flag": True, "id": "o-1"}, True),
    ({"a": 1}, [{"a": 1}], False),  # data that is not an object has no keys
    (None, [1, 2], True),  # no match: every event of the type
    ({}, "text", True),
]


@pytest.mark.parametrize(("match", "data", "accepted"), RULE_CASES)
def test_the_rule_in_python(match: Any, data: Any, accepted: bool) -> None:
    """``matches`` is the rule; a wait's key is among the keys of every event it accepts (so the index
    finds it), and equal values have equal canonical texts."""
    assert matches(match, data) is accepted
    if accepted and match:
        assert wait_key("t", match).key in event_keys("t", data).keys
        assert set(wait_key("t", match).pairs) <= set(event_keys("t", data).pairs)
    if not match:
        assert wait_key("t", match).key == event_keys("t", data).type_key


def test_canonical_texts_and_keys() -> None:
    assert canonical({"b": [1.0, True, None], "a": "é"}) == '{"a":"\\u00e9","b":[1,true,null]}'
    assert canonical(1e300) == str(10**300 + int(1e300) - 10**300)  # the double's exact integer
    assert pair_text("k", 0.1) == '"k":0.1'
    assert event_keys("t", {"k": 1}).keys == event_keys("t", {"k": 1.0}).keys
    assert event_keys("t", {"k": 1}).keys != event_keys("t", {"k": True}).keys
    assert event_keys("t", {"k": 1}).keys != event_keys("u", {"k": 1}).keys  # the type is in the key
    assert event_keys("t", {"k": 1}).type_key == _matching.type_key("t") != event_keys("u", {}).type_key
    assert all(-(2**63) <= k < 2**63 for k in event_keys("t", {str(n): n for n in range(100)}).keys)
    wide = _matching.WIDE_EVENT_PAIRS
    assert not event_keys("t", {str(n): n for n in range(wide)}).wide  # a shared lock per pair
    assert event_keys("t", {str(n): n for n in range(wide + 1)}).wide  # the type's lock, exclusive
    # the indexed pair prefers a value that tells instances apart over a flag, then the first key
    assert wait_key("t", {"paid": True, "order": "o-1"}).indexed == '"order":"o-1"'
    assert wait_key("t", {"b": 2, "a": 1}).indexed == '"a":1'
    assert wait_key("t", {"b": None, "a": False}).indexed == '"a":false'


async def test_the_rule_on_both_backends(make_app: MakeApp) -> None:
    """Each case twice, with its own event type: the event sent before the wait (found by the wait's
    lookup of events) and after it (found by the send's lookup of waits). The probe is sent first and a
    fallback that surely matches second: the instance takes the probe exactly when the rule accepts it."""
    app = make_app()

    @app.workflow
    async def probe(ctx: geste.WorkflowContext, event_type: str, match: Any, gate: str | None) -> str:
        if gate is not None:  # the events are sent while the instance waits for its gate
            await ctx.wait_event("rule.gate", match={"gate": gate})
        return (await ctx.wait_event(event_type, match=match)).event_id

    def fallback(match: Any) -> dict[str, Any]:
        return {**(match or {}), "_fallback": True}

    async with app:
        handles = []
        for n, (match, data, accepted) in enumerate(RULE_CASES):
            early = await probe.start(f"rule.{n}.early", match, f"g{n}")
            late = await probe.start(f"rule.{n}.late", match, None)
            handles += [(early, n, accepted), (late, n, accepted)]
            await wait_status(app, early.instance_id, geste.Status.WAITING)
            await app.send_event(f"rule.{n}.early", data, event_id=f"{n}.early.probe")
            await app.send_event(f"rule.{n}.early", fallback(match), event_id=f"{n}.early.fallback")
            await app.send_event("rule.gate", {"gate": f"g{n}"})
            await wait_status(app, late.instance_id, geste.Status.WAITING)
            await app.send_event(f"rule.{n}.late", data, event_id=f"{n}.late.probe")
            await app.send_event(f"rule.{n}.late", fallback(match), event_id=f"{n}.late.fallback")
        for handle, n, accepted in handles:
            taken = await handle.result(timeout=15)
            assert taken.endswith("probe" if accepted else "fallback"), (RULE_CASES[n], taken)


# -- keys, wide events, targets ---------------------------------------------------------------------------
async def test_a_wide_event_and_waits_on_several_keys(make_app: MakeApp) -> None:
    """An event with 40 top-level keys (more than WIDE_EVENT_PAIRS: PostgreSQL locks the type instead of
    each pair) reaches a wait indexed by one of them and one matching three; a wait on one of its keys
    with another value does not take it; an event sent to one instance reaches only that one."""
    app = make_app()

    @app.workflow
    async def one(ctx: geste.WorkflowContext, match: dict[str, Any]) -> Any:
        return (await ctx.wait_event("wide", match=match)).data["k7"]

    wide = {f"k{n}": n for n in range(40)}
    assert event_keys("wide", wide).wide
    async with app:
        single = await one.start({"k7": 7})
        several = await one.start({"k3": 3, "k39": 39, "k20": 20.0})
        other = await one.start({"k7": 8})
        targeted = await one.start({"k1": "x"})
        bystander = await one.start({"k1": "x"})
        for handle in (single, several, other, targeted, bystander):
            await wait_status(app, handle.instance_id, geste.Status.WAITING)
        await app.send_event("wide", wide)
        assert await single.result(timeout=10) == 7
        assert await several.result(timeout=10) == 7
        await app.send_event("wide", {"k1": "x", "k7": "to one"}, instance_id=targeted.instance_id)
        assert await targeted.result(timeout=10) == "to one"
        assert (await app.get_instance(other.instance_id)).status == geste.Status.WAITING
        assert (await app.get_instance(bystander.instance_id)).status == geste.Status.WAITING
        await app.send_event("wide", {"k7": 8})
        assert await other.result(timeout=10) == 8


async def test_each_event_has_a_key_per_pair_and_the_retention_deletes_them(
    make_app: MakeApp, db_url: str
) -> None:
    """One ``geste_event_keys`` row per top-level pair of each event (what the waits read); the retention
    deletes them with their events."""
    app = make_app(event_retention=3600.0)

    @app.workflow
    async def one(ctx: geste.WorkflowContext, order: str) -> Any:
        return (await ctx.wait_event("paid", match={"order": order})).data

    async with app:
        handle = await one.start("o-2")
        for n in range(5):
            await app.send_event("paid", {"order": f"o-{n}", "amount": n})
        assert await handle.result(timeout=10) == {"order": "o-2", "amount": 2}
        keys = await raw_query(db_url, "SELECT count(*) AS n FROM geste_event_keys")
        assert keys == [{"n": 10}]
        await app.storage.channel_cleanup(
            messages_before=0.0, events_before=app.clock() + 1.0, limit=1000
        )  # every event is older than that
        assert await raw_query(db_url, "SELECT count(*) AS n FROM geste_events") == [{"n": 0}]
        assert await raw_query(db_url, "SELECT count(*) AS n FROM geste_event_keys") == [{"n": 0}]


# -- what older versions wrote ------------------------------------------------------------------------------
async def test_the_migration_keys_the_waits_an_older_geste_registered(db_url: str) -> None:
    """A database of schema 10 with two waiting instances (one with a match, one without) and an event:
    the migration gives both waits their key (and, on PostgreSQL, their pairs), so a send finds and
    hands them their events by key; the old event, without keys, is still found by type."""
    instance = (
        "INSERT INTO {t}geste_instances (instance_id, workflow_name, status, input, created_at, updated_at,"
        " event_floor) VALUES ('{id}', 'w', 'waiting', '{{}}', 1.0, 1.0, 0)"
    )
    wait = (
        "INSERT INTO {t}geste_event_waits (instance_id, event_type, match, since, outcome_seq, after_seq)"
        " VALUES ('{id}', 'paid', {match}, 1.0, 2, 0)"
    )
    rows = [
        instance.replace("{id}", "keyed"),
        instance.replace("{id}", "any"),
        wait.replace("{id}", "keyed").replace("{match}", '\'{{"order": "A"}}\''),
        wait.replace("{id}", "any").replace("{match}", "NULL"),
        "INSERT INTO {t}geste_events (event_id, event_type, data, created_at)"
        " VALUES ('old', 'x', '{{}}', 1.0)",
    ]
    await database_at_version(db_url, 10, rows)
    async with geste.App(db_url, run_worker=False) as app:
        waits = await raw_query(
            db_url, "SELECT instance_id, match_key FROM geste_event_waits ORDER BY instance_id"
        )
        assert waits == [
            {"instance_id": "any", "match_key": wait_key("paid", None).key},
            {"instance_id": "keyed", "match_key": wait_key("paid", {"order": "A"}).key},
        ]
        if db_url.startswith("postgres"):
            pairs = await raw_query(db_url, "SELECT match_pairs FROM geste_event_waits ORDER BY instance_id")
            assert pairs == [{"match_pairs": []}, {"match_pairs": ['"order":"A"']}]
        assert await raw_query(db_url, "SELECT keyed FROM geste_events") == [{"keyed": False}]
        stored, woken = await app.storage.send_event(
            NewEvent("e1", "paid", '{"order":"A"}', None, None, None, app.clock())
        )
        assert stored and sorted(woken) == ["any", "keyed"]
        for instance_id in ("any", "keyed"):  # handed straight into the history
            history = await app.history(instance_id)
            assert [(str(e.kind), e.payload["event_id"]) for e in history] == [("event", "e1")]


async def test_events_and_waits_without_keys_still_meet(make_app: MakeApp, db_url: str) -> None:
    """What a geste of an older version, still running beside this one, writes: an event without keys
    (``keyed`` false) is found by a new wait (by type); a wait without a key is found by a new send (by
    type) and woken, takes its event itself, and waits by key from then on. A spurious wake of such a
    wait (another order) only makes it wait again, keyed."""
    app = make_app()

    @app.workflow
    async def two(ctx: geste.WorkflowContext, order: str) -> list[Any]:
        first = await ctx.wait_event("paid", match={"order": order})
        second = await ctx.wait_event("paid", match={"order": order})
        return [first.event_id, second.event_id]

    async with app:
        handle = await two.start("A")
        await wait_status(app, handle.instance_id, geste.Status.WAITING)
        # an old sender's event: no keys; visible (seq above the instance's floor)
        await raw_query(
            db_url,
            "INSERT INTO geste_events (event_id, event_type, data, created_at) "
            "VALUES ('old', 'paid', '{\"order\": \"A\"}', 1.0)",
        )
        await app.resume(handle.instance_id)  # a later wake-up: it looks again, finds it by type

        async def second_wait() -> bool:
            rows = await raw_query(db_url, "SELECT outcome_seq FROM geste_event_waits")
            return rows == [{"outcome_seq": 4}]

        await wait_until(second_wait, "the second wait")
        # as an older geste would have registered it: no key
        await raw_query(db_url, "UPDATE geste_event_waits SET match_key = NULL")
        await app.send_event("paid", {"order": "B"}, event_id="other")  # woken (PostgreSQL), waits again

        async def keyed_again() -> bool:
            rows = await raw_query(db_url, "SELECT match_key FROM geste_event_waits")
            return rows == [{"match_key": wait_key("paid", {"order": "A"}).key}]

        if db_url.startswith("postgres"):
            await wait_until(keyed_again, "the woken instance to wait again, keyed")
            await raw_query(db_url, "UPDATE geste_event_waits SET match_key = NULL, match_pairs = NULL")
        await app.send_event("paid", {"order": "A"}, event_id="new")
        assert await handle.result(timeout=10) == ["old", "new"]


# -- the index: plans over 100,000 waits and 100,000 events of one type --------------------------------
SEEDED = 100_000
HOT = 20
"""Seeded: SEEDED instances ``w-<g>`` waiting for ``paid`` events, each matching its own order ``o-<g>``
(the first HOT all matching order ``hot``), and SEEDED ``paid`` events ``{"order": "o-<g>", "amount": g}``,
each delivered to its instance; one more instance, ``reader``, started before them all."""
TABLES = (
    "geste_event_waits",
    "geste_events",
    "geste_event_keys",
    "geste_instances",
    "geste_event_deliveries",
)


def seeded_rows(now: float) -> dict[str, list[Any]]:
    orders = ["hot" if g < HOT else f"o-{g}" for g in range(SEEDED)]
    waits = [wait_key("paid", {"order": order}) for order in orders]
    events = [event_keys("paid", {"order": f"o-{g}", "amount": g}) for g in range(SEEDED)]
    return {
        "instances": [f"w-{g}" for g in range(SEEDED)],
        "matches": [json.dumps({"order": order}) for order in orders],
        "wait_keys": [w.key for w in waits],
        "wait_pairs": [w.pairs[0] for w in waits],
        "events": [json.dumps({"order": f"o-{g}", "amount": g}) for g in range(SEEDED)],
        "event_keys": [(key, g + 1) for g, e in enumerate(events) for key in e.keys],
    }


SEED_POSTGRES = [
    """INSERT INTO geste_instances (instance_id, workflow_name, status, input, created_at, updated_at,
                                    event_floor)
       SELECT i, 'w', 'waiting', '{}', $2::float8, $2::float8, 0 FROM unnest($1::text[]) AS i
       UNION ALL SELECT 'reader', 'w', 'running', '{}', $2::float8, $2::float8, 0""",
    """INSERT INTO geste_event_waits (instance_id, event_type, match, since, outcome_seq, after_seq,
                                      match_key, match_pairs)
       SELECT i, 'paid', m, $2, 2, 0, k, ARRAY[p]
       FROM unnest($1::text[], $3::text[], $4::bigint[], $5::text[]) AS u(i, m, k, p)""",
    """INSERT INTO geste_events (seq, event_id, event_type, data, created_at, keyed)
       SELECT n, 'e-' || n, 'paid', d, $2, true FROM unnest($1::text[]) WITH ORDINALITY AS u(d, n)""",
    """INSERT INTO geste_event_keys (match_key, event_seq)
       SELECT * FROM unnest($1::bigint[], $2::bigint[])""",
    """INSERT INTO geste_event_deliveries (instance_id, event_seq)
       SELECT 'w-' || (n - 1), n FROM generate_series(1, $1::integer) AS n""",
]


def sql_literal(value: Any) -> str:
    """A parameter as SQL text (``EXPLAIN EXECUTE`` takes no ``$n``)."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    if isinstance(value, float):
        return f"{value!r}::double precision"
    if isinstance(value, int):
        return str(value)
    if all(isinstance(item, int) for item in value):
        return f"ARRAY[{', '.join(str(item) for item in value)}]::bigint[]"
    return f"ARRAY[{', '.join(sql_literal(item) for item in value)}]::text[]"


def plan_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    nodes = [plan]
    for child in plan.get("Plans", []):
        nodes += plan_nodes(child)
    return nodes


def rows_read(nodes: list[dict[str, Any]]) -> Counter[str]:
    """Rows each table gave the plan, kept or filtered out, over all loops (EXPLAIN gives per-loop
    averages); a table's own writes (ModifyTable) are not reads."""
    read: Counter[str] = Counter()
    for node in nodes:
        if node.get("Relation Name") in TABLES and node["Node Type"] != "ModifyTable":
            removed = node.get("Rows Removed by Filter", 0) + node.get("Rows Removed by Index Recheck", 0)
            read[node["Relation Name"]] += round((node["Actual Rows"] + removed) * node["Actual Loops"])
    return read


def send_parameters(data: Any, *, event_id: str, target: str | None, now: float) -> list[Any]:
    """What ``PostgresStorage.send_event`` passes to the ``send_event`` statement."""
    keys = event_keys("paid", data)
    return [event_id, "paid", None, json.dumps(data), None, target, now, list(keys.keys), keys.lookup,
            list(keys.pairs), "{}", False]  # fmt: skip


@pytest.mark.parametrize("plan_cache_mode", ["force_custom_plan", "force_generic_plan"])
async def test_a_send_and_a_wait_read_by_index_on_postgres(pg_url: str, plan_cache_mode: str) -> None:
    """EXPLAIN ANALYZE of the real statements, with the parameters the storage passes, over 100,000 waits
    and 100,000 events of one type, with the custom plan and the generic one asyncpg switches to after
    five runs: no table is scanned whole, and the rows read follow the matches. A send matching one wait
    reads a few rows (its keys' index entries, the wait, its instance twice), one matching HOT waits about
    HOT times as many, one sent to an instance its wait; a wait reads the index entries of its pair above
    its floor and their events; a wait without a match the first event of the type it may take."""
    import asyncpg

    from geste.storage.postgres import parse_postgres_url, schema_queries

    dsn, options = parse_postgres_url(pg_url)
    queries = schema_queries(options["schema"])
    now = time.time()
    seed = seeded_rows(now)
    async with geste.App(pg_url, run_worker=False):  # migrated
        conn = await asyncpg.connect(dsn, server_settings={"search_path": options["schema"]})
        try:
            await conn.execute(SEED_POSTGRES[0], seed["instances"], now)
            await conn.execute(
                SEED_POSTGRES[1],
                seed["instances"],
                now,
                seed["matches"],
                seed["wait_keys"],
                seed["wait_pairs"],
            )
            await conn.execute(SEED_POSTGRES[2], seed["events"], now)
            keys, seqs = zip(*seed["event_keys"], strict=True)
            await conn.execute(SEED_POSTGRES[3], list(keys), list(seqs))
            await conn.execute(SEED_POSTGRES[4], SEEDED)
            await conn.execute("SELECT setval('geste_events_seq_seq', $1)", SEEDED)
            await conn.execute("ANALYZE")
            await conn.execute(f"SET plan_cache_mode = {plan_cache_mode}")
            cases: list[tuple[str, str, list[Any], int]] = [  # (what, query, parameters, most rows read)
                ("send, one wait", "send_event",
                 send_parameters({"order": "o-4242", "amount": -1}, event_id="x", target=None, now=now), 8),
                ("send, HOT waits", "send_event",
                 send_parameters({"order": "hot"}, event_id="x", target=None, now=now), 5 * HOT + 8),
                ("send to one instance", "send_event",
                 send_parameters({"order": "o-77"}, event_id="x", target="w-77", now=now), 8),
                ("send, no wait", "send_event",
                 send_parameters({"order": "nobody"}, event_id="x", target=None, now=now), 4),
                ("wait, its pair", "candidate_events_by_key",
                 ["paid", "reader", wait_key("paid", {"order": "o-4242"}).key], 6),
                ("wait, no match", "candidate_events", ["paid", "reader"], 6),
            ]  # fmt: skip
            for what, name, params, most in cases:
                arguments = ", ".join(sql_literal(value) for value in params)
                transaction = conn.transaction()
                await transaction.start()
                try:  # EXPLAIN ANALYZE runs the send: rolled back
                    await conn.execute(f"PREPARE plan_under_test AS {queries[name]}")
                    found = await conn.fetchval(
                        f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE plan_under_test({arguments})"
                    )
                finally:
                    await transaction.rollback()
                    await conn.execute("DEALLOCATE plan_under_test")
                nodes = plan_nodes(json.loads(found)[0]["Plan"])
                read = rows_read(nodes)
                shown = (what, [(n["Node Type"], n.get("Relation Name"), n.get("Index Name")) for n in nodes])
                assert not any(
                    n["Node Type"] == "Seq Scan" and n.get("Relation Name") in TABLES for n in nodes
                ), shown
                assert sum(read.values()) <= most, (what, read, shown)
                if name == "send_event":  # the waits were found through the index of their keys
                    by_key = [n for n in nodes if n.get("Index Name") in ("geste_event_waits_by_key",)]
                    assert by_key or params[5] is not None, shown
                if name == "candidate_events_by_key":  # the range of its key in geste_event_keys
                    assert any(n.get("Index Name") == "geste_event_keys_pkey" for n in nodes), shown
                if "HOT" in what:
                    assert read["geste_event_waits"] >= HOT, (what, read)
        finally:
            await conn.close()


async def test_a_send_and_a_wait_read_by_index_on_sqlite(tmp_path: Path) -> None:
    """The same seeded tables on SQLite: the send's queries (``waits_for_event``, ``..._target``) and the
    wait's (``candidate_events_by_key``, ``candidate_events``) search their indexes, never scan a table,
    and run a small fraction of the instructions of one pass over the waits."""
    from geste.storage.sqlite import Q

    path = tmp_path / "seeded.db"
    now = time.time()
    seed = seeded_rows(now)
    async with geste.App(f"sqlite:///{path}", run_worker=False):
        with contextlib.closing(sqlite3.connect(path)) as conn:
            with conn:
                conn.executemany(
                    "INSERT INTO geste_instances (instance_id, workflow_name, status, input, created_at,"
                    " updated_at, event_floor) VALUES (?, 'w', 'waiting', '{}', ?, ?, 0)",
                    [(i, now, now) for i in [*seed["instances"], "reader"]],
                )
                conn.executemany(
                    "INSERT INTO geste_event_waits (instance_id, event_type, match, since, outcome_seq,"
                    " after_seq, match_key) VALUES (?, 'paid', ?, ?, 2, 0, ?)",
                    zip(seed["instances"], seed["matches"], [now] * SEEDED, seed["wait_keys"], strict=True),
                )
                conn.executemany(
                    "INSERT INTO geste_events (seq, event_id, event_type, data, created_at, keyed)"
                    " VALUES (?, ?, 'paid', ?, ?, 1)",
                    [(n + 1, f"e-{n + 1}", data, now) for n, data in enumerate(seed["events"])],
                )
                conn.executemany("INSERT INTO geste_event_keys VALUES (?, ?)", seed["event_keys"])
                conn.executemany(
                    "INSERT INTO geste_event_deliveries VALUES (?, ?)",
                    [(f"w-{n}", n + 1) for n in range(SEEDED)],
                )
            conn.execute("ANALYZE")
            one_pass = vm_steps(conn, "SELECT count(*) FROM geste_event_waits WHERE match <> ''", {})
            event = event_keys("paid", {"order": "o-4242", "amount": -1})
            hot = event_keys("paid", {"order": "hot"})
            cases = {
                "waits_for_event": {
                    "event_type": "paid",
                    "seq": SEEDED + 1,
                    "keys": json.dumps(event.lookup),
                },
                "waits_for_event_target": {"event_type": "paid", "seq": SEEDED + 1, "target": "w-77"},
                "candidate_events_by_key": {
                    "event_type": "paid",
                    "instance_id": "reader",
                    "match_key": wait_key("paid", {"order": "o-4242"}).key,
                },
                "candidate_events": {"event_type": "paid", "instance_id": "reader"},
            }
            for name, params in cases.items():
                plan = [r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + Q[name], params)]
                assert not any(step.startswith("SCAN") and "json_each" not in step for step in plan), (
                    name,
                    plan,
                )
                assert any(step.startswith("SEARCH") for step in plan), (name, plan)
                steps = vm_steps(conn, Q[name], params)
                assert steps <= one_pass // 200, (name, steps, one_pass)
            found = conn.execute(Q["waits_for_event"], cases["waits_for_event"]).fetchall()
            assert [r[0] for r in found] == ["w-4242"]
            hot_params = {**cases["waits_for_event"], "keys": json.dumps(hot.lookup)}
            assert len(conn.execute(Q["waits_for_event"], hot_params).fetchall()) == HOT
            assert vm_steps(conn, Q["waits_for_event"], hot_params) <= one_pass // 50


# -- the locks (PostgreSQL) ----------------------------------------------------------------------------------
async def waiting_for_advisory_lock(pg_url: str, key: int) -> bool:
    """Whether a backend waits for the advisory lock ``key`` (a bigint: pg_locks splits it in two)."""
    rows = await raw_query(
        pg_url,
        "SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        " AND classid = $1::bigint::oid AND objid = $2::bigint::oid AND objsubid = 1"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        (key >> 32) & 0xFFFFFFFF,
        key & 0xFFFFFFFF,
    )
    return bool(rows[0]["n"])


async def test_a_wait_holds_its_own_key_only(pg_url: str) -> None:
    """A connection holds what a wait for order A holds (its transaction open, between "no event yet" and
    "now waiting"). Sends of another order of the type, of another type, and a wait for another order go
    through; a send of order A waits for it (no lost wake-up), and so does a wide event (which locks the
    type). Sends of one key hold it shared: they never wait for each other."""
    import asyncpg

    from geste.storage.postgres import parse_postgres_url, schema_queries

    dsn, options = parse_postgres_url(pg_url)
    lock = schema_queries(options["schema"])["lock_event_keys"]
    key_a, key_b = wait_key("paid", {"order": "A"}), wait_key("paid", {"order": "B"})
    async with geste.App(pg_url, run_worker=False) as app:
        waiter, other, sender = [await asyncpg.connect(dsn) for _ in range(3)]
        try:
            async with sender.transaction():  # a send of A in flight holds its keys shared: no conflict
                keys = event_keys("paid", {"order": "A"}).lookup
                await sender.execute(lock, "paid", keys, False, [False] * len(keys))
                await asyncio.wait_for(app.send_event("paid", {"order": "A", "n": 0}), 10)
            async with waiter.transaction():
                await waiter.execute(lock, "paid", [key_a.key], False, [True])  # a wait for A, in flight
                await asyncio.wait_for(app.send_event("paid", {"order": "B"}), 10)
                await asyncio.wait_for(app.send_event("shipped", {"order": "A"}), 10)
                async with other.transaction():  # a wait for B at the same time
                    await asyncio.wait_for(other.execute(lock, "paid", [key_b.key], False, [True]), 10)

                held_up = asyncio.create_task(app.send_event("paid", {"order": "A", "n": 1}))
                await wait_until(
                    lambda: waiting_for_advisory_lock(pg_url, key_a.key), "the send of A to wait"
                )
                wide = asyncio.create_task(app.send_event("paid", {f"k{n}": n for n in range(40)}))
                type_lock = await raw_query(pg_url, "SELECT hashtextextended('geste_event:paid', 0) AS k")
                await wait_until(
                    lambda: waiting_for_advisory_lock(pg_url, type_lock[0]["k"]), "the wide send to wait"
                )
                assert not held_up.done() and not wide.done()
            assert await asyncio.wait_for(held_up, 10) and await asyncio.wait_for(wide, 10)
        finally:
            for conn in (waiter, other, sender):
                await conn.close()


async def test_two_sends_racing_for_one_waiting_instance(pg_url: str) -> None:
    """Both sends find the instance waiting; they are held on its row (a connection holds it) until both
    wait there, then go one after the other. The first hands it its event; the second finds its history
    changed, hands nothing (its event kept) and the instance takes it at its next wait: both sends
    succeed, each event is taken once (before, the second wrote the same history row: a key violation)."""
    import asyncpg

    from geste.storage.postgres import parse_postgres_url

    dsn, options = parse_postgres_url(pg_url)
    app = geste.App(pg_url, poll_interval=0.05, lock_timeout=5.0)

    @app.workflow
    async def twice(ctx: geste.WorkflowContext) -> list[str]:
        first = await ctx.wait_event("paid", match={"order": "A"})
        second = await ctx.wait_event("paid", match={"order": "A"})
        return [first.event_id, second.event_id]

    async with app:
        handle = await twice.start()
        await wait_status(app, handle.instance_id, geste.Status.WAITING)
        holder = await asyncpg.connect(dsn, server_settings={"search_path": options["schema"]})
        try:
            async with holder.transaction():
                await holder.execute(
                    "SELECT 1 FROM geste_instances WHERE instance_id = $1 FOR UPDATE", handle.instance_id
                )
                sends = [
                    asyncio.create_task(app.send_event("paid", {"order": "A"}, event_id=eid))
                    for eid in ("s1", "s2")
                ]

                async def both_held() -> bool:
                    rows = await raw_query(
                        pg_url,
                        "SELECT count(*) AS n FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                        " AND query LIKE $1",
                        f'%INSERT INTO "{options["schema"]}".geste_events%',
                    )
                    return rows[0]["n"] == 2

                await wait_until(both_held, "both sends to wait for the instance's row")
            assert [await s for s in sends] == ["s1", "s2"]  # neither failed
        finally:
            await holder.close()
        assert sorted(await handle.result(timeout=10)) == ["s1", "s2"]
        history = [e for e in await handle.history() if e.kind == geste.StepKind.EVENT]
        assert sorted(e.payload["event_id"] for e in history) == ["s1", "s2"]
        deliveries = await raw_query(pg_url, "SELECT instance_id FROM geste_event_deliveries")
        assert len(deliveries) == 2


# -- the race: two processes, many senders and waiters ----------------------------------------------------
CHAINS = 60
STEPS = 5
GROUPS = 4
"""CHAINS instances each take STEPS events, one per step, each matching only that step of that instance:
``{"id": "c<n>", "step": j, "group": n % GROUPS, "kind": "k"}`` (id ``c<n>-<j>``), sent in STEPS waves
(step j of every chain at once), chains of even n by this process, odd n by the other. Per group two
instances take every event of the group (one matching the group, one the group and the kind), and two
instances with no match take every event."""


def race_events(side: int) -> list[str]:
    return [
        f"{j}:c{n}-{j}=" + json.dumps({"id": f"c{n}", "step": j, "group": n % GROUPS, "kind": "k"})
        for j in range(STEPS)
        for n in range(CHAINS)
        if n % 2 == side
    ]


@pytest.fixture
async def race_process(tmp_path: Path, db_url: str) -> AsyncIterator[tuple[Path, subprocess.Popen[bytes]]]:
    output = tmp_path / "other.out"
    cmd = ["tests.apps.events_app", db_url, f"--folder={tmp_path}", "--name=other", "--events"]
    proc = start_process([*cmd, *race_events(1)], output=output)
    try:
        yield tmp_path, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def test_many_senders_and_waiters_race_across_two_processes(
    db_url: str, race_process: tuple[Path, subprocess.Popen[bytes]]
) -> None:
    """This process and another each run a worker and send half of the events, wave after wave, while the
    instances take them and wait again: a chain's next wait races the send of its next event (a lost
    wake-up leaves it waiting for good: no later event matches), and two senders race for the group
    and no-match collectors. Each instance takes exactly the events it matches, each once, the deliveries
    say the same, and no send failed."""
    from tests.apps.events_app import build_app, parse, send_all

    folder, proc = race_process
    app = build_app(db_url, worker_id="race-here", poll_interval=0.05, lock_timeout=30.0)
    every = {f"c{n}-{j}": n for n in range(CHAINS) for j in range(STEPS)}
    async with app:

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError((folder / "other.out").read_text())
            return (folder / "ready-other").exists()

        await wait_until(ready, "the other process", timeout=30)
        expected: dict[str, list[str] | set[str]] = {}
        for n in range(CHAINS):
            handle = await app.start_workflow("chain", f"c{n}", STEPS)
            expected[handle.instance_id] = [f"c{n}-{j}" for j in range(STEPS)]  # in this order
        for g in range(GROUPS):
            for match in ({"group": g}, {"kind": "k", "group": g}):
                handle = await app.start_workflow("collector", match, CHAINS // GROUPS * STEPS)
                expected[handle.instance_id] = {e for e, n in every.items() if n % GROUPS == g}
        for _ in range(2):
            handle = await app.start_workflow("collector", None, len(every))
            expected[handle.instance_id] = set(every)
        (folder / "go").touch()  # both processes send now
        await send_all(app, parse(race_events(0)))
        await wait_until(
            lambda: (folder / "sent-other").exists() or (folder / "failed-other").exists(), "sent"
        )
        assert not (folder / "failed-other").exists(), (folder / "failed-other").read_text()
        for instance_id, wanted in expected.items():
            taken = await app.get_handle(instance_id).result(timeout=60)
            if isinstance(wanted, list):
                assert taken == wanted, (instance_id, taken)
            else:
                assert len(taken) == len(set(taken)) and set(taken) == wanted, (instance_id, sorted(taken))
        deliveries = await raw_query(db_url, "SELECT instance_id, event_seq FROM geste_event_deliveries")
        assert Counter(d["instance_id"] for d in deliveries) == {i: len(w) for i, w in expected.items()}
        assert len({(d["instance_id"], d["event_seq"]) for d in deliveries}) == len(deliveries)


async def test_the_benchmark_runs_at_a_tiny_size() -> None:
    """``benchmarks/event_matching.py``'s ``event_wakeup`` (what ``benchmarks/scale.py`` imports), at CI
    size: 200 seeded waiters, keyed as the storage keys them, and three wake-ups measured (counts, not
    times)."""
    from .conftest import POSTGRES_URL

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from event_matching import event_wakeup
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    sample = await event_wakeup(POSTGRES_URL, 200, samples=3, warmup=1)
    assert sample.waiters == 200 and len(sample.wakeups) == len(sample.sends) == 3
    assert all(value > 0 for value in (*sample.sends, *sample.wakeups))


def test_a_wait_whose_match_is_not_an_object_is_left_unkeyed() -> None:
    """Migration 12's Python part gives a key to every wait geste wrote and skips a match changed by hand
    (not JSON, or not an object) rather than failing the upgrade: that wait stays found by type."""
    from geste.storage._decisions import keyed_waits

    rows = [
        {"instance_id": "a", "event_type": "t", "match": '{"k": 1}'},
        {"instance_id": "b", "event_type": "t", "match": None},
        {"instance_id": "c", "event_type": "t", "match": "[1]"},
        {"instance_id": "d", "event_type": "t", "match": "{not json"},
    ]
    assert keyed_waits(rows) == [("a", wait_key("t", {"k": 1})), ("b", wait_key("t", None))]
