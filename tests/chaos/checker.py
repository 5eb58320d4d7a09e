"""The chaos checker: what must hold once a run is over, read from the database and the side-effect logs.

Each check is a named function that returns a one-line summary of what it verified, or raises
``AssertionError`` with what it found wrong; ``check`` runs them all and reports every failure, not
only the first.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from ..support import raw_query
from .app import LEDGERS, NEWS_EVERY, read_lines, value_of
from .controller import FAULT_LOG, RUN_DROPPED, ChaosConfig, dropped_lines

ACTIVITIES = ("reserve", "charge", "ship", "book", "work")


@dataclass
class Facts:
    """Everything the checks look at, read once."""

    config: ChaosConfig
    instances: dict[str, dict[str, Any]]
    history: dict[str, list[dict[str, Any]]]
    outbox: list[dict[str, Any]]
    messages: list[dict[str, Any]]
    leftovers: dict[str, int]
    effects: list[dict[str, Any]]
    deliveries: list[dict[str, Any]]
    acks: list[dict[str, Any]]
    faults: list[dict[str, Any]]
    """The pauses and partitions (``controller.FAULT_LOG``)."""
    lost_leases: dict[str, int]
    """By worker output file: its lines that say a lease was lost."""

    def result(self, instance_id: str) -> Any:
        return json.loads(self.instances[instance_id]["result"])


async def gather(url: str, folder: Path, config: ChaosConfig) -> Facts:
    instances = {r["instance_id"]: r for r in await raw_query(url, "SELECT * FROM geste_instances")}
    history: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in await raw_query(url, "SELECT * FROM geste_history ORDER BY instance_id, seq"):
        history[row["instance_id"]].append(row)
    leftovers = {}
    for table, where in (
        ("geste_timers", "true"),
        ("geste_event_waits", "true"),
        ("geste_channel_subscriptions", "waiting_since IS NOT NULL"),
        ("geste_instances", "locked_by IS NOT NULL OR run_at IS NOT NULL OR lease_id IS NOT NULL"),
    ):
        rows = await raw_query(url, f"SELECT count(*) AS n FROM {table} WHERE {where}")
        leftovers[table] = int(rows[0]["n"])
    return Facts(
        config=config,
        instances=instances,
        history=dict(history),
        outbox=await raw_query(url, "SELECT * FROM geste_outbox"),
        messages=await raw_query(url, "SELECT * FROM geste_channel_messages"),
        leftovers=leftovers,
        effects=read_lines(folder / "effects.jsonl"),
        deliveries=read_lines(folder / "deliveries.jsonl"),
        acks=read_lines(folder / "acks.jsonl"),
        faults=_reported_later(folder, read_lines(folder / FAULT_LOG)),
        lost_leases=_lost_lease_lines(folder),
    )


def _lost_lease_lines(folder: Path) -> dict[str, int]:
    return {path.name: dropped_lines(path) for path in folder.glob("worker-*.out")}


ENDED_WITHIN = 10.0
"""A paused worker told to end this soon after it resumed (killed by a later fault, or the run's end; else
its output's last line) may not have had the time to find out: its silence is excused (``ended``), and
counted."""


def _reported_later(folder: Path, faults: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The pauses the controller saw no report of when it stopped waiting (two renewals after the resume:
    a run's next write can come later): the report may have come after (``logged``, ``late``); or the run
    of one of its leases was dropped just before the pause (a failed write, its release failed too: the
    lease stayed, with no run left to report it; ``logged``, ``before``); or the worker was told to end
    before it could (killed by a later fault, or the run's end: ``ended``)."""
    ends: dict[str, float] = {}
    for fault in faults:
        if fault["fault"] == "end":
            ends.setdefault(fault["output"], fault["at"])
    return [_pause_reported_later(folder, fault, ends) for fault in faults]


def _pause_reported_later(folder: Path, fault: dict[str, Any], ends: dict[str, float]) -> dict[str, Any]:
    if fault["fault"] != "pause" or not fault["taken"] or fault["logged"] or "resumed" not in fault:
        return fault
    lines = _timed_lines(folder / fault["output"])
    dropped = [(at, line) for at, line in lines if any(said in line for said in RUN_DROPPED)]
    if any(at >= fault["resumed"] - 1.0 for at, _ in dropped):
        return {**fault, "logged": True, "late": True}
    stopped = fault["resumed"] - fault["seconds"]
    named = [f"instance {instance_id}:" for instance_id in fault.get("instances", ())]
    if any(at >= stopped - DROPPED_BEFORE and any(n in line for n in named) for at, line in dropped):
        return {**fault, "logged": True, "before": True}
    ended = ends.get(fault["output"], lines[-1][0] if lines else None)
    if ended is not None and ended < fault["resumed"] + ENDED_WITHIN:
        return {**fault, "ended": True}
    return fault


DROPPED_BEFORE = 2.0
"""How long before a pause a run of one of its leases may have been dropped (and said so) for that line
to be the pause's report."""


def _timed_lines(output: Path) -> list[tuple[float, str]]:
    """The log lines of a worker's output with their time (``logging``'s ``asctime``, the machine's true
    clock: a worker's skew is its App's clock only)."""
    timed = []
    for line in output.read_text(errors="replace").splitlines():
        try:
            at = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        except ValueError:
            continue  # a traceback's line, a stack dump's
        timed.append((at, line))
    return timed


def _activity_rows(facts: Facts, instance_id: str) -> list[dict[str, Any]]:
    return [r for r in facts.history.get(instance_id, []) if r["kind"] == "activity" and not r["is_error"]]


def _recorded_run(row: dict[str, Any]) -> str:
    payload = json.loads(row["payload"])
    return str(payload["result"]["run"])


def every_instance_completed(facts: Facts) -> str:
    config = facts.config
    expected = config.orders + LEDGERS + config.listeners + config.competitors
    statuses = Counter(r["status"] for r in facts.instances.values())
    assert len(facts.instances) == expected, f"{len(facts.instances)} instances, expected {expected}"
    bad = {i: (r["status"], r["error"]) for i, r in facts.instances.items() if r["status"] != "completed"}
    assert not bad, f"not completed: {dict(list(bad.items())[:5])} ({len(bad)} in all)"
    return f"{expected} instances, all completed ({dict(statuses)})"


def orders_have_the_right_results(facts: Facts) -> str:
    for n in range(facts.config.orders):
        instance_id = f"order-{n}"
        result = facts.result(instance_id)
        assert result["order"] == n and result["amount"] == n * 2, (instance_id, result)
        assert result["values"] == [value_of(s, n) for s in ("reserve", "charge", "ship")], (
            instance_id,
            result,
        )
        assert result["event_id"] == f"{instance_id}:{_outbox_seq(facts, instance_id)}", (instance_id, result)
        recorded = [_recorded_run(r) for r in _activity_rows(facts, instance_id)]
        assert result["runs"] == recorded, f"{instance_id} used {result['runs']}, history has {recorded}"
    return f"{facts.config.orders} orders: values, amounts, event ids right; each used its recorded results"


def _outbox_seq(facts: Facts, instance_id: str) -> int:
    seqs = [r["seq"] for r in facts.history[instance_id] if r["kind"] == "send_event"]
    assert len(seqs) == 1, (instance_id, seqs)
    return int(seqs[0])


def histories_are_whole(facts: Facts) -> str:
    rows = 0
    for instance_id, history in facts.history.items():
        seqs = [r["seq"] for r in history]
        assert seqs == list(range(1, len(seqs) + 1)), f"{instance_id}: history seqs {seqs}"
        rows += len(seqs)
    return f"{rows} history rows, every instance's seqs contiguous from 1"


def no_activity_result_recorded_twice(facts: Facts) -> str:
    """Each activity call has one recorded result, from an execution that really ended (its token is in
    the side-effect log exactly once), and no two recorded results share an execution."""
    ended = Counter(e["run"] for e in facts.effects if e["event"] == "end")
    started = Counter((e["instance"], e["key"]) for e in facts.effects if e["event"] == "start")
    keys: Counter[tuple[str, str, int]] = Counter()
    recorded = 0
    for instance_id in facts.instances:
        for row in _activity_rows(facts, instance_id):
            run = _recorded_run(row)
            assert ended[run] == 1, f"{instance_id} seq {row['seq']}: run {run} ended {ended[run]} times"
            keys[(instance_id, row["name"], row["seq"])] += 1
            recorded += 1
    twice = [k for k, c in keys.items() if c > 1]
    assert not twice, f"recorded twice: {twice[:5]}"
    orders_steps = sum(len(_activity_rows(facts, f"order-{n}")) for n in range(facts.config.orders))
    assert orders_steps == 3 * facts.config.orders, f"{orders_steps} order activities recorded"
    executions = sum(started.values())
    return (
        f"{recorded} activity results recorded once each; {executions} executions started "
        f"({executions - recorded} re-runs after failures, kills or lost leases: at least once)"
    )


def acknowledged_steps_kept(facts: Facts) -> str:
    """Every activity outcome an order saw committed (``acks.jsonl``: the reserve past its sleep, the
    charge past its outbox event) is the one recorded at the end: no acknowledged step was lost (a lost
    one would have been run again, and the re-run's outcome recorded instead)."""
    kept = set()
    for ack in facts.acks:
        index = {"reserve": 0, "charge": 1}[ack["step"]]
        recorded = facts.result(ack["instance"])["runs"][index]
        assert recorded == ack["run"], (
            f"{ack['instance']} {ack['step']}: run {ack['run']} was acknowledged, {recorded} is recorded"
        )
        kept.add((ack["instance"], ack["step"]))
    assert len(kept) == 2 * facts.config.orders, f"{len(kept)} acknowledged steps logged"
    return f"{len(kept)} acknowledged steps (2 per order), each still recorded with the outcome acknowledged"


def direct_messages_received_exactly_once(facts: Facts) -> str:
    config = facts.config
    for k in range(LEDGERS):
        result = facts.result(f"ledger-{k}")
        orders = result["orders"]
        assert sorted(orders) == list(range(k, config.orders, LEDGERS)), f"ledger-{k} got {sorted(orders)}"
        recorded = [_recorded_run(r) for r in _activity_rows(facts, f"ledger-{k}")]
        assert result["runs"] == recorded, f"ledger-{k} used other results than recorded"
    direct = [m for m in facts.messages if m["target_instance_id"]]
    unclaimed = [m["message_id"] for m in direct if m["claimed_by"] is None]
    assert len(direct) == config.orders and not unclaimed, (len(direct), unclaimed[:5])
    return f"{config.orders} direct messages, each received by its ledger exactly once"


def broadcasts_received_exactly_once_by_each(facts: Facts) -> str:
    config = facts.config
    news = [m for m in facts.messages if m["channel"] == "chaos.news"]
    published = [m["message_id"] for m in sorted(news, key=lambda m: m["seq"])]
    assert len(published) == config.news, f"{len(published)} news stored, expected {config.news}"
    for k in range(config.listeners):
        got = facts.result(f"listener-{k}")
        assert got == published, (
            f"listener-{k} got {len(got)} ({len(set(got))} distinct), not the {config.news}"
        )
    orders_news = len(range(0, config.orders, NEWS_EVERY))
    return (
        f"{config.news} broadcasts ({orders_news} from workflows, {config.client_news} from outside, "
        f"duplicates stored once), each received once and in order by all {config.listeners} listeners"
    )


def competing_messages_taken_exactly_once(facts: Facts) -> str:
    config = facts.config
    taken: list[int] = []
    stops = []
    for k in range(config.competitors):
        result = facts.result(f"competitor-{k}")
        taken += result["jobs"]
        stops.append(result["stop"])
        recorded = [_recorded_run(r) for r in _activity_rows(facts, f"competitor-{k}")]
        assert result["runs"] == recorded, f"competitor-{k} used other results than recorded"
    assert sorted(taken) == list(range(config.jobs)), (
        f"jobs taken: {Counter(taken).most_common(3)}, {len(taken)}"
    )
    assert sorted(stops) == sorted(f"stop-{k}" for k in range(config.competitors)), stops
    return f"{config.jobs} jobs shared by {config.competitors} competitors, each taken exactly once"


def outbox_events_delivered(facts: Facts) -> str:
    config = facts.config
    ids = sorted(r["event_id"] for r in facts.outbox)
    assert ids == sorted(f"order-{n}:{_outbox_seq(facts, f'order-{n}')}" for n in range(config.orders)), (
        f"{len(ids)} outbox rows for {config.orders} orders"
    )
    pending = [r["event_id"] for r in facts.outbox if r["status"] != "delivered"]
    assert not pending, f"not delivered: {pending[:5]}"
    refused = [d for d in facts.deliveries if d.get("refused")]
    delivered = Counter(d["event_id"] for d in facts.deliveries if not d.get("refused"))
    missing = [i for i in ids if delivered[i] == 0]
    assert not missing, f"no delivery seen for {missing[:5]}"
    extra = sum(delivered.values()) - len(ids)
    outage = (
        f"; {len(refused)} attempts on {len({d['event_id'] for d in refused})} events refused by the outage"
        if refused
        else ""
    )
    return (
        f"{len(ids)} outbox events, one per order, each delivered (at least once: {extra} extra deliveries)"
        + outage
    )


def nothing_left_locked_or_waiting(facts: Facts) -> str:
    left = {table: n for table, n in facts.leftovers.items() if n}
    assert not left, f"left behind: {left}"
    return (
        "no instance locked, runnable, sleeping or waiting; no timer, event wait or waiting subscription left"
    )


PAUSE_REPORTED_WITHIN = 4.0
"""A pause shorter than this (under the workers' 5 s ``command_timeout``) leaves no claim whose answer
came too late: every lease the worker held is one of its runs, which must report the loss."""


def paused_workers_dropped_their_lost_runs(facts: Facts) -> str:
    """A worker paused while it held leases that others took over says so after it resumes ("lease
    lost": its runs stop, their results are dropped; that none was recorded is the other checks'
    proof), and its log has at least one such line per pause that found it out."""
    pauses = [f for f in facts.faults if f["fault"] == "pause"]
    silent = [
        f
        for f in pauses
        if f["taken"] and f["seconds"] < PAUSE_REPORTED_WITHIN and not f["logged"] and not f.get("ended")
    ]
    assert not silent, f"paused workers whose lost leases went unreported: {silent[:3]}"
    late, ended = sum(1 for f in pauses if f.get("late")), sum(1 for f in pauses if f.get("ended"))
    before = sum(1 for f in pauses if f.get("before"))
    reported = Counter(f["output"] for f in pauses if f["logged"])
    short = {
        o: (n, facts.lost_leases.get(o, 0)) for o, n in reported.items() if facts.lost_leases.get(o, 0) < n
    }
    assert not short, f"paused workers that logged fewer lost leases than pauses (pauses, lines): {short}"
    caught = sum(1 for f in pauses if f["taken"])
    partitions = [f for f in facts.faults if f["fault"] == "partition"]
    return (
        f"{len(pauses)} pauses ({caught} with leases taken over by others, {sum(reported.values())} "
        f"reported, {late} of them after the controller stopped waiting, {before} by a run dropped just "
        f"before the pause; {ended} whose worker was told to end within {ENDED_WITHIN:g}s of the resume): "
        f"{sum(facts.lost_leases.get(o, 0) for o in reported)} lost-lease lines in those "
        f"workers' logs; {len(partitions)} partitions"
    )


CHECKS = (
    every_instance_completed,
    orders_have_the_right_results,
    histories_are_whole,
    no_activity_result_recorded_twice,
    acknowledged_steps_kept,
    direct_messages_received_exactly_once,
    broadcasts_received_exactly_once_by_each,
    competing_messages_taken_exactly_once,
    outbox_events_delivered,
    nothing_left_locked_or_waiting,
    paused_workers_dropped_their_lost_runs,
)


async def check(url: str, folder: Path, config: ChaosConfig) -> list[str]:
    """Run every check; return their summaries, or raise one AssertionError listing every failure."""
    facts = await gather(url, folder, config)
    passed, failed = [], []
    for fn in CHECKS:
        try:
            passed.append(f"ok    {fn.__name__}: {fn(facts)}")
        except (AssertionError, KeyError, TypeError, ValueError) as exc:
            failed.append(f"FAIL  {fn.__name__}: {type(exc).__name__}: {exc}")
    if failed:
        raise AssertionError("\n".join([*failed, *passed]))
    return passed
