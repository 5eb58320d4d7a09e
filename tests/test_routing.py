"""Routing a wake-up to one worker (issue 15): the rule each listener applies, alone and in processes.

The rule (``geste.runtime.routing.Router``) is checked on its own: the worker a notification names while
it is routable, else a rendezvous hash over the routable workers of the workflow; a joining worker takes
only what moves to it, a leaving one gives only its own; a stale, stopped, deaf or non-serving worker is
never chosen; a timer is taken over only when its keeper is gone. Then with worker processes on a real
PostgreSQL (``tests/apps/routing_app.py``): the claims a wake-up costs with 1 and 4 workers, a target
killed between the notification and its claim, a timer whose keeper died, a full target, a lost
notification, a burst. Every wait is for a condition with a deadline; the bounds asserted are the ones
docs/design.md ("Wake-ups") gives.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

import geste
from geste.runtime.routing import ROUTABLE_SLACK, RUNNER_SEPARATOR, Router, score
from geste.runtime.wakeups import TIMER_EXPIRED, WORKFLOW_RESUMABLE, Listener, Wakeups
from geste.storage.base import WorkerRow

from .processes import start_process, wait_ready
from .support import plan_nodes, raw_query, sql_literal, wait_until

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # so that `tests.apps` is importable however pytest was started
    sys.path.insert(0, str(ROOT))

from tests.apps.routing_app import build_app, herd  # noqa: E402
from tests.apps.worker import read_log  # noqa: E402
from tests.conftest import POSTGRES_URL, _admin  # noqa: E402

LISTENING = json.dumps({"state": "listening"})


def row(
    worker_id: str, *, at: float, workflows: tuple[str, ...] | None = ("w",), **changes: Any
) -> WorkerRow:
    """A registry row as a live worker with lock_timeout 3 s (a heartbeat every second) writes it."""
    fields: dict[str, Any] = {
        "worker_id": worker_id,
        "host": "h",
        "pid": 1,
        "started_at": at - 100,
        "heartbeat_at": at,
        "running": 0,
        "concurrency": 10,
        "listener": LISTENING,
        "lock_timeout": 3.0,
        "workflows": None if workflows is None else json.dumps(list(workflows)),
        **changes,
    }
    return WorkerRow(**fields)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def routers(names: list[str], clock: Clock, *, workflows: tuple[str, ...] = ("w",)) -> dict[str, Router]:
    """One router per worker, each with a view of all the others (as after a heartbeat)."""
    found = {}
    for name in names:
        router = Router(name, workflows=lambda: workflows, relay=True, lock_timeout=3.0, clock=clock)
        router.update([row(other, at=clock.now, workflows=workflows) for other in names if other != name])
        found[name] = router
    return found


def owners(views: dict[str, Router], keys: list[str], **kwargs: Any) -> dict[str, set[str]]:
    """For each key, the workers that find it theirs."""
    return {key: {name for name, r in views.items() if r.mine(key, "w", **kwargs)} for key in keys}


KEYS = [f"instance-{n}" for n in range(400)]


# -- the rule ----------------------------------------------------------------------------------------------
def test_agreeing_views_send_each_wake_up_to_exactly_one_worker_and_spread_them() -> None:
    clock = Clock()
    views = routers([f"w{n}" for n in range(5)], clock)
    found = owners(views, KEYS)
    assert all(len(who) == 1 for who in found.values()), [k for k, w in found.items() if len(w) != 1]
    per_worker = Counter(next(iter(who)) for who in found.values())
    assert len(per_worker) == 5 and min(per_worker.values()) > 40, per_worker  # 80 each on average
    for key, who in found.items():  # the same choice in every process: a hash with no per-process seed
        assert who == {max(views, key=lambda w: score(key, w))}


def test_the_named_worker_takes_it_while_routable_and_registers_the_workflow() -> None:
    clock = Clock()
    views = routers(["a", "b", "c"], clock)
    assert all(who == {"b"} for who in owners(views, KEYS[:50], worker="b").values())
    # not when it is the one to avoid (it gave the instance back): hashed over the others
    avoided = owners(views, KEYS[:50], worker="b", avoid="b")
    assert all(len(who) == 1 and "b" not in who for who in avoided.values())
    # a name nobody knows (a worker that died long ago, another cluster's): hashed
    assert all(len(who) == 1 for who in owners(views, KEYS[:50], worker="gone").values())
    # a named worker that does not register the workflow (redeployed without it): hashed
    views["a"].update([row("b", at=clock.now, workflows=("other",)), row("c", at=clock.now)])
    assert {views["a"].target(key, "w", worker="b") for key in KEYS[:50]} == {"a", "c"}


def test_a_stale_stopped_or_deaf_worker_is_never_chosen() -> None:
    clock = Clock()
    me = Router("me", workflows=lambda: ("w",), relay=False, lock_timeout=3.0, clock=clock)
    stale_after = 2 * 1.0 + ROUTABLE_SLACK  # two of its heartbeat periods (lock_timeout 3 s) and the slack
    me.update(
        [
            row("late", at=clock.now - stale_after - 0.01),
            row("fresh", at=clock.now - stale_after + 0.01),
            row("deaf", at=clock.now, listener=json.dumps({"state": "reconnecting"})),
            row("stopped", at=clock.now, stopped_at=clock.now),
            row("unregistered", at=clock.now, listener=None),
        ]
    )
    chosen = {me.target(key, "w") for key in KEYS}
    assert chosen == {"me", "fresh"}
    assert me.target("x", "w", worker="late") in {"me", "fresh"}  # named, but not routable
    clock.now += 0.02  # the fresh one's heartbeat ages past the window: not chosen any more
    assert {me.target(key, "w") for key in KEYS} == {"me"}


def test_a_joining_worker_takes_only_what_moves_to_it_and_a_leaving_one_gives_only_its_own() -> None:
    clock = Clock()
    before = routers(["a", "b", "c"], clock)
    after = routers(["a", "b", "c", "d"], clock)
    was = {key: before["a"].target(key, "w") for key in KEYS}
    now = {key: after["a"].target(key, "w") for key in KEYS}
    moved = [key for key in KEYS if was[key] != now[key]]
    assert moved and all(now[key] == "d" for key in moved)  # only to the new worker
    # while the views differ (d and one old worker know of d, two do not), each instance has an owner
    # (duplicates are the keys moving to d: claimed twice, harmlessly, with SKIP LOCKED)
    mixed = {"a": before["a"], "b": before["b"], "c": after["c"], "d": after["d"]}
    found = owners(mixed, KEYS)
    assert all(who for who in found.values())
    assert {key for key, who in found.items() if len(who) > 1} <= set(moved)
    # a leaving worker: only its own instances move, each to one of the others
    gone = {key: routers(["a", "b"], clock)["a"].target(key, "w") for key in KEYS}
    assert all(gone[key] == was[key] for key in KEYS if was[key] != "c")


def test_only_the_workers_of_a_workflow_are_chosen() -> None:
    clock = Clock()
    a = Router("a", workflows=lambda: ("w",), relay=False, lock_timeout=3.0, clock=clock)
    a.update([row("b", at=clock.now, workflows=("v",)), row("old", at=clock.now, workflows=None)])
    # "old" registered no workflows: a geste older than schema 9, which claimed any workflow
    assert {a.target(key, "v") for key in KEYS} == {"b", "old"}
    assert not any(a.mine(key, "v") for key in KEYS)  # a does not run v: never its
    assert {a.target(key, "nobody-runs-this") for key in KEYS} == {"old"}


def test_a_pinned_instances_wake_up_goes_only_to_a_worker_of_its_version() -> None:
    """Workers register their claim keys (schema 27): a pinned workflow's name and its runner, the name
    with the worker's version. A payload of a pinned instance names its runner: every view sends it to a
    worker of that version, by the hash among them or to its named worker; never to a worker of another
    version, even one it names (its last worker, redeployed), nor to nobody while one of its version lives.
    An unpinned instance's key is the name: hashed over all of them, as before."""
    clock = Clock()
    keys = {v: ("w", f"w{RUNNER_SEPARATOR}{v}") for v in ("v1", "v2")}
    versions = {"a": "v1", "b": "v2", "c": "v2", "d": "v1"}
    views = {}
    for name, version in versions.items():
        router = Router(
            name,
            workflows=lambda: ("w",),
            claim_keys=lambda v=version: keys[v],  # type: ignore[misc]
            relay=False,
            lock_timeout=3.0,
            clock=clock,
        )
        router.update([row(o, at=clock.now, workflows=keys[versions[o]]) for o in versions if o != name])
        views[name] = router
    for version in ("v1", "v2"):
        runner = f"w{RUNNER_SEPARATOR}{version}"
        of_version = {n for n, v in versions.items() if v == version}
        found = {key: {n for n, r in views.items() if r.mine(key, runner)} for key in KEYS}
        assert all(len(who) == 1 and who <= of_version for who in found.values()), found
        assert set().union(*found.values()) == of_version  # spread over the workers of the version
        other = next(n for n in versions if n not in of_version)
        named = {key: {n for n, r in views.items() if r.mine(key, runner, other)} for key in KEYS[:50]}
        assert all(len(who) == 1 and who <= of_version for who in named.values()), named
        assert {views[other].target(key, runner, worker=other) for key in KEYS} == of_version
    unpinned = {key: {n for n, r in views.items() if r.mine(key, "w")} for key in KEYS}
    assert all(len(who) == 1 for who in unpinned.values())
    assert set().union(*unpinned.values()) == set(versions)
    # a version no live worker runs: nobody (its instances wait for such a worker, counted in status())
    assert all(r.target(key, f"w{RUNNER_SEPARATOR}v3") is None for r in views.values() for key in KEYS[:20])
    # a router given no claim keys (a client, or a worker serving queues only) claims no runner
    bare = Router("e", workflows=lambda: ("w",), relay=False, lock_timeout=3.0, clock=clock)
    assert not bare.claims(f"w{RUNNER_SEPARATOR}v1") and bare.claims("w") and not bare.claims(None)


def test_a_timer_is_taken_over_only_when_its_keeper_is_gone_or_restarted() -> None:
    clock = Clock()
    views = routers(["a", "b", "c"], clock)
    heard = clock.now - 1
    # its keeper lives: nobody else claims it when it rings
    assert not any(views[w].takes_over(key, "w", "a", heard) for w in ("b", "c") for key in KEYS[:50])
    # its keeper stopped heartbeating: exactly one of the others takes each
    clock.now += 10
    for w in ("b", "c"):
        views[w].update([row(o, at=clock.now) for o in ("b", "c") if o != w] + [row("a", at=clock.now - 10)])
    for key in KEYS[:50]:
        assert [w for w in ("b", "c") if views[w].takes_over(key, "w", "a", heard)] == [
            max(("b", "c"), key=lambda w: score(key, w))
        ]
    # restarted since (its local timers went with the old process), alive again: taken over too
    for w in ("b", "c"):
        views[w].update(
            [row(o, at=clock.now) for o in ("b", "c") if o != w]
            + [row("a", at=clock.now, started_at=heard + 1)]
        )
    assert all(sum(views[w].takes_over(key, "w", "a", heard) for w in ("b", "c")) == 1 for key in KEYS[:50])
    assert views["a"].takes_over("x", "w", "a", heard)  # its own


def test_outbox_notifications_go_to_the_recording_relay_or_one_other() -> None:
    clock = Clock()

    def make(name: str, relay: bool) -> Router:
        return Router(name, workflows=lambda: ("w",), relay=relay, lock_timeout=3, clock=clock)

    relays = {"r1": make("r1", True), "r2": make("r2", True), "plain": make("plain", False)}
    for name, router in relays.items():
        router.update([row(o, at=clock.now, relay=o != "plain") for o in relays if o != name])
    keys = [f"event-{n}" for n in range(100)]
    # recorded by r1 (its relay was told directly): nobody else looks
    assert not any(relays[r].relay_mine(k, "r1") for r in ("r2", "plain") for k in keys)
    # recorded by a worker without a relay, or by a client: one relay, never the relay-less worker
    for worker in ("plain", None):
        takers = [[r for r in relays if relays[r].relay_mine(k, worker)] for k in keys]
        assert all(len(t) == 1 and t[0] != "plain" for t in takers)


def test_sole_tells_whether_another_live_worker_runs_these_workflows() -> None:
    clock = Clock()
    a = Router("a", workflows=lambda: ("w", "v"), relay=False, lock_timeout=3.0, clock=clock)
    a.update([row("b", at=clock.now, workflows=("x",))])
    assert a.sole()
    a.update([row("b", at=clock.now, workflows=("x", "v"))])
    assert not a.sole()
    clock.now += 60  # b went silent
    assert a.sole()


def test_the_listener_routes_by_the_payload_and_ignores_other_schemas() -> None:
    clock = Clock()
    wakeups = Wakeups(poll_interval=1.0, fallback_interval=30.0, clock=clock, lookahead=0.0)
    wakeups.router = Router(
        "me", workflows=lambda: ("w",), relay=False, lock_timeout=3.0, clock=clock, schema="s"
    )
    wakeups.router.update([row("other", at=clock.now)])
    wakeups.listening = True
    listener = Listener(lambda *a: None, wakeups=wakeups, reconnect_delay=1.0, on_caught_up=lambda: None)  # type: ignore[arg-type,return-value]

    def hear(channel: str, **body: Any) -> None:
        listener._on_notification(channel, json.dumps(body))

    hear(WORKFLOW_RESUMABLE, instance_id="i1", workflow_name="w", worker="me", schema="s")
    hear(WORKFLOW_RESUMABLE, instance_id="i2", workflow_name="w", worker="other", schema="s")
    hear(WORKFLOW_RESUMABLE, instance_id="i3", workflow_name="w", worker="me", schema="elsewhere")
    hear(
        WORKFLOW_RESUMABLE, instance_id="i4", workflow_name="w", worker="me", schema="s", finished="completed"
    )
    assert list(wakeups.routed) == ["i1"] and not wakeups.take_generic()
    # a payload of an older geste (no routing fields): routed by the hash, to one worker
    mine = [k for k in KEYS if wakeups.router.target(k, "w") == "me"]
    hear(WORKFLOW_RESUMABLE, instance_id=mine[0], workflow_name="w")
    assert list(wakeups.routed) == ["i1", mine[0]]
    # no instance named at all: every worker claims, as before routing
    hear(WORKFLOW_RESUMABLE)
    assert wakeups.take_generic()
    # timers: kept here if routed here, else watched (claimed only if their keeper is gone); one that
    # names this worker is its own suspension's, whose local timer it set then
    orphan = mine[1]  # its keeper is unknown here (gone): hashed, to this worker
    for instance_id, keeper in (("t-self", "me"), (orphan, "gone"), ("t-other", "other")):
        hear(
            TIMER_EXPIRED,
            instance_id=instance_id,
            workflow_name="w",
            timer_id=3,
            expires_at=clock.now + 1,
            worker=keeper,
        )
    hear(TIMER_EXPIRED, instance_id="t3", timer_id=3, expires_at=clock.now + 1)  # an older geste's: its own
    assert wakeups.next_timer() == clock.now + 1
    clock.now += 1
    wakeups.ring()
    assert list(wakeups.routed) == ["i1", mine[0], orphan]  # other is alive: t-other is its own
    assert not wakeups.take_generic()


def test_a_start_onto_a_queue_goes_to_exactly_one_live_worker_serving_it() -> None:
    """Schema 23: the registry lists the queues each worker serves; a start onto a queue goes to one
    routable worker among those that serve it (spread by the instance id), never to one that does not
    serve it, nor to a stale or deaf one; with none, to nobody (the poll net admits it)."""
    clock = Clock()
    served = {"a": ("q",), "b": ("q", "r"), "c": (), "d": ("q",)}
    views = {}
    for name in served:
        router = Router(name, workflows=lambda: ("w",), relay=False, lock_timeout=3.0, clock=clock)
        router.update(
            [
                row(other, at=clock.now, queues=json.dumps(list(q)))
                for other, q in served.items()
                if other != name
            ]
        )
        views[name] = router

    def takers(queue: str, key: str) -> set[str]:
        return {
            name
            for name, r in views.items()
            if r.queue_target(queue, key, serving=queue in served[name]) == name
        }

    chosen = Counter()
    for key in KEYS:
        (taker,) = takers("q", key)  # exactly one, whichever view decides
        chosen[taker] += 1
        assert takers("r", key) == {"b"}
        assert not takers("none-serves-it", key)
    assert set(chosen) == {"a", "b", "d"} and min(chosen.values()) > len(KEYS) / 6  # spread
    # d's heartbeat goes stale, b's listener stops: the others route around them
    clock.now += 10
    for name in ("a", "c"):
        views[name].update(
            [
                row("b", at=clock.now, queues=json.dumps(["q", "r"]), listener=json.dumps({"state": "x"})),
                row("d", at=clock.now - 10, queues=json.dumps(["q"])),
                *(row(o, at=clock.now, queues=json.dumps(list(served[o]))) for o in ("a", "c") if o != name),
            ]
        )
    assert all(views["a"].queue_target("q", key, serving=True) == "a" for key in KEYS)
    assert all(views["c"].queue_target("q", key, serving=False) == "a" for key in KEYS)
    # a row written before schema 23 serves no queue
    old = Router("o", workflows=lambda: ("w",), relay=False, lock_timeout=3.0, clock=clock)
    old.update([row("p", at=clock.now)])
    assert old.queue_target("q", "k", serving=False) is None


def test_the_listener_routes_a_queue_start_to_one_worker_and_pokes_without_a_router() -> None:
    clock = Clock()
    wakeups = Wakeups(poll_interval=1.0, fallback_interval=30.0, clock=clock, lookahead=0.0)
    wakeups.router = Router("me", workflows=lambda: ("w",), relay=False, lock_timeout=3.0, clock=clock)
    wakeups.router.update([row("other", at=clock.now, queues=json.dumps(["q"]))])
    wakeups.listening = True
    wakeups.queues = frozenset({"q"})
    listener = Listener(lambda *a: None, wakeups=wakeups, reconnect_delay=1.0, on_caught_up=lambda: None)  # type: ignore[arg-type,return-value]

    def hear(**body: Any) -> None:
        listener._on_notification(WORKFLOW_RESUMABLE, json.dumps(body))

    mine = [k for k in KEYS if wakeups.router.queue_target("q", k, serving=True) == "me"]
    theirs = [k for k in KEYS if wakeups.router.queue_target("q", k, serving=True) == "other"]
    hear(queue="q", instance_id=theirs[0])
    hear(queue="elsewhere", instance_id=mine[0])
    assert not wakeups.queued and not wakeups.take_generic() and not wakeups.event.is_set()
    hear(queue="q", instance_id=mine[0])
    assert wakeups.queued == {"q": "notify"} and not wakeups.take_generic() and not wakeups.routed
    # the listener down (or no router: SQLite never hears one): every serving worker runs a whole round
    wakeups.queued.clear()
    wakeups.listening = False
    hear(queue="q", instance_id=theirs[0])
    assert wakeups.take_generic() and not wakeups.queued


def test_a_routing_error_falls_back_to_a_whole_claim(caplog: pytest.LogCaptureFixture) -> None:
    """Whatever goes wrong in the routing of a notification (a bug, a view in a state nobody foresaw), the
    listener logs it and asks for a whole claim round, which finds the work: it never stops listening."""
    clock = Clock()
    wakeups = Wakeups(poll_interval=1.0, fallback_interval=30.0, clock=clock)
    router = Router("me", workflows=lambda: ("w",), relay=False, lock_timeout=3.0, clock=clock)

    def broken(*args: Any, **kwargs: Any) -> bool:
        raise RuntimeError("a routing bug")

    router.mine = broken  # type: ignore[method-assign]
    wakeups.router, wakeups.listening = router, True
    listener = Listener(lambda *a: None, wakeups=wakeups, reconnect_delay=1.0, on_caught_up=lambda: None)  # type: ignore[arg-type,return-value]
    listener._on_notification(WORKFLOW_RESUMABLE, json.dumps({"instance_id": "i", "workflow_name": "w"}))
    assert wakeups.take_generic() and not wakeups.routed
    assert any("a routing bug" in r.getMessage() or r.exc_info for r in caplog.records)


# -- claims by id, on both backends --------------------------------------------------------------------------
async def test_claim_ids_takes_the_named_due_instances_of_its_workflows_only(
    make_app: Callable[..., geste.App],
) -> None:
    app = make_app(run_worker=False)

    @app.workflow
    async def w(ctx: geste.WorkflowContext) -> None: ...

    @app.workflow
    async def other(ctx: geste.WorkflowContext) -> None: ...

    async with app:
        due = [(await w.start()).instance_id for _ in range(3)]
        elsewhere = (await other.start()).instance_id
        unnamed = (await w.start()).instance_id
        later = (await w.start()).instance_id
        now = app.clock()
        taken = await app.storage.claim("x", now, now + 60, 10, workflows=["w"])  # take all, to set run_at
        await app.storage.release(
            [c.lease for c in taken if c.lease.instance_id == later], now, run_at=now + 30
        )
        await app.storage.release([c.lease for c in taken if c.lease.instance_id != later], now)
        claims = await app.storage.claim_ids(
            "me", now + 1, now + 61, [*due, elsewhere, later, "no-such-id", due[0]], workflows=["w"]
        )
        assert sorted(c.lease.instance_id for c in claims) == sorted(due)
        assert claims.later == {later: pytest.approx(now + 30)}  # named, free, not due: when it is
        assert all(c.history == () and c.lease.lease_id for c in claims)
        assert unnamed not in {c.lease.instance_id for c in claims}  # only what is named
        again = await app.storage.claim_ids("other", now + 2, now + 62, due, workflows=["w"])
        assert list(again) == [] and again.later == {}  # held now: nothing, no later either
        found = await raw_query(
            app.url, "SELECT last_worker FROM geste_instances WHERE instance_id = $1", later
        )
        assert found == [{"last_worker": "x"}]  # the releaser: a release sets it, as a suspension does


# -- worker processes ---------------------------------------------------------------------------------------
class Fleet:
    """Worker processes of ``tests/apps/routing_app.py`` on one database, and their reports."""

    def __init__(self, folder: Path, url: str) -> None:
        self.folder, self.url = folder, url
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.reports = folder / "reports.jsonl"

    async def spawn(self, worker_id: str, *args: str, env: dict[str, str] | None = None) -> int:
        ready = self.folder / f"ready-{worker_id}"
        output = self.folder / f"{worker_id}.out"
        cmd = [
            "tests.apps.routing_app",
            self.url,
            f"--worker-id={worker_id}",
            f"--ready={ready}",
            f"--report={self.reports}",
            *args,
        ]
        proc = start_process(cmd, output=output, env=env or {})
        self.procs[worker_id] = proc
        await wait_ready(proc, ready, output=output, what=f"{worker_id} (listening)", timeout=30)
        return proc.pid

    async def report(self, worker_id: str) -> dict[str, Any]:
        """What the worker counted so far (its claim rounds and runs by cause, what it handed on)."""
        seen = len(read_log(self.reports))
        self.procs[worker_id].send_signal(signal.SIGUSR1)

        def written() -> dict[str, Any] | None:
            lines = [r for r in read_log(self.reports)[seen:] if r["worker"] == worker_id]
            return lines[-1] if lines else None

        found: dict[str, Any] = await wait_until(written, f"a report of {worker_id}")
        return found

    async def converged(self, *worker_ids: str) -> None:
        """Each worker's view holds all the others as listening: every registry row says so, and every
        worker heartbeated (read the others) after that."""

        async def listening() -> bool:
            rows = await raw_query(self.url, "SELECT worker_id, listener FROM geste_workers")
            state = {r["worker_id"]: json.loads(r["listener"] or "{}").get("state") for r in rows}
            return all(state.get(w) == "listening" for w in worker_ids)

        await wait_until(listening, "the workers to register as listening", timeout=30)
        since = time.time()

        async def read_since() -> bool:
            rows = await raw_query(self.url, "SELECT worker_id, heartbeat_at FROM geste_workers")
            beat = {r["worker_id"]: r["heartbeat_at"] for r in rows}
            return all(beat.get(w, 0) > since for w in worker_ids)

        await wait_until(read_since, "every worker to read the others", timeout=30)

    def kill(self, worker_id: str, signum: int = signal.SIGKILL) -> None:
        self.procs[worker_id].send_signal(signum)

    def stop(self, worker_id: str) -> None:
        proc = self.procs.pop(worker_id)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
            proc.wait()


@pytest.fixture
def own_database() -> Iterator[str]:
    """A PostgreSQL database of this test's own, for the tests that count claims: channels are per
    database, and other test runs in the shared one send notifications an older geste formats without a
    schema (each of which makes every worker here claim, as it would in a mixed-version cluster)."""
    name = f"geste_routing_{uuid.uuid4().hex[:12]}"
    _admin(f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit(urlsplit(POSTGRES_URL)._replace(path=f"/{name}"))
    finally:
        _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def fleet(tmp_path: Path, own_database: str) -> Iterator[Fleet]:
    group = Fleet(tmp_path, own_database)
    try:
        yield group
    finally:
        group.stop_all()


@pytest.fixture
async def client(own_database: str) -> AsyncIterator[geste.App]:
    """Starts and sends (no worker); it also creates the schema."""
    async with build_app(own_database, run_worker=False) as app:
        yield app


def routed_to(worker: str, among: list[str], prefix: str) -> str:
    """An instance id whose wake-ups, with nothing else to go by, go to ``worker`` of ``among``."""
    for n in range(10_000):
        key = f"{prefix}-{n}-{uuid.uuid4().hex[:8]}"
        if max(among, key=lambda w: score(key, w)) == worker:
            return key
    raise AssertionError("no key found")


async def settled(url: str, instance_id: str, steps: int) -> int:
    """Wait until the instance waits for its next event with more than ``steps`` steps; return them."""

    async def check() -> int | None:
        (found,) = await raw_query(
            url, "SELECT status, run_at, steps FROM geste_instances WHERE instance_id = $1", instance_id
        )
        done = found["status"] == "waiting" and found["run_at"] is None and found["steps"] > steps
        return int(found["steps"]) if done else None

    result: int = await wait_until(check, f"{instance_id} to wait again")
    return result


def claims_for_wakeups(before: dict[str, Any], after: dict[str, Any]) -> float:
    """Claim statements between two reports, the poll net's left out (it runs every
    notify_fallback_interval whatever happens: not a cost of the wake-ups)."""
    return sum(after["rounds"][c] - before["rounds"][c] for c in after["rounds"] if c != "poll")


async def test_a_wake_up_costs_as_many_claims_with_four_workers_as_with_one(
    tmp_path: Path, own_database: str
) -> None:
    """Issue 15's wake-up (an event, then a 0.2 s durable sleep), one at a time, with 1 and then 4 worker
    processes: the claim statements it causes in the whole cluster. Before routing, each worker claimed
    at each notification and at each timer (and once more when a timer was set): 4 workers ran about 4x
    the claims of one. Now the notification and the timer each cost one claim, whatever the workers."""
    pg_url = own_database
    fleet = Fleet(tmp_path, pg_url)
    try:
        async with build_app(pg_url, run_worker=False) as client:
            per_wakeup = await _claims_per_wakeup(fleet, client, pg_url)
    finally:
        fleet.stop_all()
    claims = {n: c for n, (c, _) in per_wakeup.items()}
    transactions = {n: t for n, (_, t) in per_wakeup.items()}
    print(f"claim statements per wake-up: {claims}; transactions: {transactions}")
    assert claims[1] <= 2.5, claims  # the event's claim and the timer's, both by id
    assert claims[4] <= 1.5 * claims[1], claims
    # what the workers began per wake-up (claims, step commits, suspensions), background left out
    assert transactions[4] <= 1.5 * transactions[1], transactions


BACKGROUND = frozenset({"heartbeat", "claim", "claim_names", "chore_take", "chore_release", "renew"})
"""What workers run whatever happens (the registry's heartbeat, the poll net's whole claims, the chores'
elections and what they run, lease renewals): left out of the transactions a wake-up costs."""


def transactions_for_wakeups(before: dict[str, Any], after: dict[str, Any]) -> float:
    """Transactions begun between two reports, less the statements of the background (each one a
    transaction of its own) and of the chores (their statements are named channel_* and prune_*)."""
    began, sent = after["statements"], before["statements"]
    total = began.get(herd.TRANSACTIONS, 0) - sent.get(herd.TRANSACTIONS, 0)
    for name, count in began.items():
        if name in BACKGROUND or name.startswith(("channel_cleanup", "channel_rewake", "prune_", "cleanup")):
            total -= count - sent.get(name, 0)
    return float(total)


async def _claims_per_wakeup(fleet: Fleet, client: geste.App, pg_url: str) -> dict[int, tuple[float, float]]:
    per_wakeup = {}
    for count in (1, 4):
        ids = [f"w{count}-{n}" for n in range(count)]
        for worker_id in ids:
            await fleet.spawn(worker_id, "--lock-timeout=3")  # a heartbeat (the views' refresh) every 1 s
        await fleet.converged(*ids)
        instances = [(await client.start_workflow("cycle", 3)).instance_id for _ in range(4)]
        steps = {iid: await settled(pg_url, iid, 0) for iid in instances}
        before = {w: await fleet.report(w) for w in ids}
        wakeups = 0
        for _ in range(2):
            for iid in instances:
                await client.send_event("routing.go", {"n": wakeups}, instance_id=iid)
                steps[iid] = await settled(pg_url, iid, steps[iid])  # woken, slept, waits again
                wakeups += 1
        after = {w: await fleet.report(w) for w in ids}
        per_wakeup[count] = (
            sum(claims_for_wakeups(before[w], after[w]) for w in ids) / wakeups,
            sum(transactions_for_wakeups(before[w], after[w]) for w in ids) / wakeups,
        )
        for worker_id in ids:
            fleet.stop(worker_id)
    return per_wakeup


def woken_by(before: dict[str, Any], after: dict[str, Any], cause: str) -> float:
    return float(after["woken"][cause] - before["woken"][cause])


async def test_a_target_killed_before_its_claim_leaves_the_wake_up_to_the_poll_net(
    fleet: Fleet, client: geste.App, own_database: str
) -> None:
    """The worker a wake-up is routed to (the instance's last worker) is frozen when the notification
    comes, then SIGKILLed: the other worker ignores the notification (the target looked alive) and its
    poll net, every notify_fallback_interval, takes the instance: within that interval and a claim."""
    pg_url = own_database
    fallback = 1.0
    options = ("--lock-timeout=3", f"--fallback-interval={fallback}")
    iid = f"frozen-{uuid.uuid4().hex}"
    await fleet.spawn("target", *options, f"--start=cycle:{iid}:1")  # runs here at once: its last worker
    survivor = await fleet.spawn("survivor", *options)
    await fleet.converged("target", "survivor")
    await settled(pg_url, iid, 0)
    (found,) = await raw_query(pg_url, "SELECT last_worker FROM geste_instances WHERE instance_id = $1", iid)
    assert found["last_worker"] == "target"
    before = await fleet.report("survivor")

    fleet.kill("target", signal.SIGSTOP)  # between the notification and its claim
    sent = time.monotonic()
    await client.send_event("routing.go", {"n": 1}, instance_id=iid)
    fleet.kill("target")
    assert await client.get_handle(iid).result(timeout=10) == [survivor]
    took = time.monotonic() - sent
    after = await fleet.report("survivor")
    assert woken_by(before, after, "poll") == 1 and woken_by(before, after, "notify") == 0, (before, after)
    assert took < fallback + 0.2 + 2.0, took  # the poll net, the 0.2 s sleep, a loaded machine's slack


async def test_a_timer_whose_keeper_died_is_taken_over_when_it_rings(
    fleet: Fleet, client: geste.App, own_database: str
) -> None:
    """Only the worker that suspended an instance keeps its timer; the other watches it. The keeper is
    SIGKILLed after the suspension; by the time the timer rings its heartbeat is stale (two periods and
    ROUTABLE_SLACK: 5 s with lock_timeout 6 s), so the watcher takes it over on time, as a timer (not
    through its poll net, which runs every 6 s)."""
    pg_url = own_database
    options = ("--lock-timeout=6",)
    await fleet.spawn("keeper", *options)
    watcher = await fleet.spawn("watcher", *options)
    await fleet.converged("keeper", "watcher")
    iid = routed_to("keeper", ["keeper", "watcher"], "nap")
    await client.start_workflow("sleeper", 8.0, instance_id=iid)

    async def suspended() -> dict[str, Any] | None:
        (found,) = await raw_query(
            pg_url, "SELECT status, last_worker, run_at FROM geste_instances WHERE instance_id = $1", iid
        )
        return found if found["status"] == "waiting" and found["run_at"] is not None else None

    found = await wait_until(suspended, "the sleeper to suspend")
    assert found["last_worker"] == "keeper"
    fleet.kill("keeper")
    before = await fleet.report("watcher")
    assert await client.get_handle(iid).result(timeout=20) == watcher
    after = await fleet.report("watcher")
    (done,) = await raw_query(pg_url, "SELECT finished_at FROM geste_instances WHERE instance_id = $1", iid)
    late = done["finished_at"] - found["run_at"]
    assert woken_by(before, after, "timer") == 1 and woken_by(before, after, "poll") == 0, (before, after)
    assert 0 <= late < 1.5, late


async def test_a_full_target_hands_the_wake_up_on(fleet: Fleet, client: geste.App, own_database: str) -> None:
    """The instance's last worker runs one instance at a time and is busy: it hands the wake-up on, once,
    to the other worker (which had room at its last heartbeat), at once rather than at a poll."""
    pg_url = own_database
    await fleet.spawn("busy", "--lock-timeout=3", "--concurrency=1", env={"GESTE_TEST_HOLD": "1"})
    helper = await fleet.spawn("helper", "--lock-timeout=3")
    await fleet.converged("busy", "helper")
    waiter = routed_to("busy", ["busy", "helper"], "wait")
    await client.start_workflow("cycle", 1, instance_id=waiter)
    await settled(pg_url, waiter, 0)
    blocker = routed_to("busy", ["busy", "helper"], "block")
    await client.start_workflow("held", instance_id=blocker)

    async def held_by_busy() -> bool:
        rows = await raw_query(
            pg_url, "SELECT locked_by FROM geste_instances WHERE instance_id = $1", blocker
        )
        return rows[0]["locked_by"] == "busy"

    await wait_until(held_by_busy, "the busy worker to run the blocker")
    before = {w: await fleet.report(w) for w in ("busy", "helper")}
    await client.send_event("routing.go", {"n": 1}, instance_id=waiter)
    assert await client.get_handle(waiter).result(timeout=10) == [helper]
    after = {w: await fleet.report(w) for w in ("busy", "helper")}
    assert after["busy"]["handed_on"] - before["busy"]["handed_on"] == 1
    assert woken_by(before["helper"], after["helper"], "notify") == 1  # the handed-on notification
    assert woken_by(before["helper"], after["helper"], "poll") == 0


async def test_a_lost_notification_is_found_by_the_poll_net_while_routed_rounds_go_on(
    own_database: str,
) -> None:
    """A sender that does not notify (``listen_notify=False``: a lost notification, as far as the worker
    can tell) wakes an instance; the worker keeps claiming routed wake-ups of another instance all along,
    and still runs its poll net every notify_fallback_interval (a routed round does not postpone it),
    which finds the instance."""
    pg_url = own_database
    fallback = 0.5
    async with (
        build_app(pg_url, notify_fallback_interval=fallback, lock_timeout=3.0) as worker,
        build_app(pg_url, run_worker=False) as client,
        build_app(pg_url, run_worker=False, listen_notify=False) as silent,
    ):
        await wait_until(lambda: worker.listener_status().state == "listening", "the listener")
        busy = (await worker.start_workflow("cycle", 1000)).instance_id
        quiet = (await worker.start_workflow("cycle", 1)).instance_id
        steps = await settled(pg_url, busy, 0)
        await settled(pg_url, quiet, 0)
        whole: list[str] = []  # what the worker's whole claims took from here on (the poll net's)
        claim = worker.storage.claim

        async def recorded(*args: Any, **kwargs: Any) -> Any:
            claims = await claim(*args, **kwargs)
            whole.extend(c.lease.instance_id for c in claims)
            return claims

        worker.storage.claim = recorded  # type: ignore[method-assign]
        sent = time.monotonic()
        await silent.send_event("routing.go", {"n": 0}, instance_id=quiet)
        done = asyncio.ensure_future(worker.get_handle(quiet).result(timeout=10))
        while not done.done():  # routed wake-ups of the busy instance, one after the other
            await client.send_event("routing.go", {"n": 1}, instance_id=busy)
            steps = await settled(pg_url, busy, steps)
        assert await done == [os.getpid()]
        took = time.monotonic() - sent
        # a whole claim (the poll net: nothing else asks for one here) took the quiet instance. Not counted
        # by the metrics' causes: the net may also take a wake-up of the busy one (due as it ran, its
        # claim by id later under load), and a net round that a late local timer began counts as a timer
        assert quiet in whole, whole
        assert took < fallback + 0.2 + 1.5 + 2.0, took  # the net, the sleep, one busy round, slack


async def test_a_burst_of_notifications_is_claimed_in_one_statement(own_database: str) -> None:
    """One event wakes 30 waiting instances: 30 notifications, routed to the one worker, which takes them
    with one claim by ids (at most a second one, if the notifications straddle a round); their 0.2 s
    sleeps ring together too, and go in a few claims."""
    pg_url = own_database
    worker = build_app(pg_url, lock_timeout=3.0)
    calls: list[int] = []
    async with worker, build_app(pg_url, run_worker=False) as client:
        await wait_until(lambda: worker.listener_status().state == "listening", "the listener")
        handles = [await worker.start_workflow("cycle", 1) for _ in range(30)]
        for handle in handles:
            await settled(pg_url, handle.instance_id, 0)
        claim_ids = worker.storage.claim_ids

        async def counted(*args: Any, **kwargs: Any) -> Any:
            calls.append(len(args[3]))
            return await claim_ids(*args, **kwargs)

        worker.storage.claim_ids = counted  # type: ignore[method-assign]
        await client.send_event("routing.go", {"n": 0})  # to every waiting instance
        results = [await h.result(timeout=10) for h in handles]
    assert results == [[os.getpid()]] * 30
    assert calls[0] == 30 or calls[0] + calls[1] == 30, calls  # the event's 30 wake-ups
    assert len(calls) <= 10, calls  # with the 30 timers after it, claimed by id as they ring together


async def test_a_wait_that_ended_early_costs_no_claim_at_its_deadline(own_database: str) -> None:
    """An event ends a wait before its 1 s deadline: the instance is claimed (by id) and ends; its
    deadline comes and goes with no claim statement (before routing, its timer made a claim round in
    every worker, for nothing). Claims are counted by the instances they name and by their cause (the
    shared test database carries other runs' notifications, which older code sends without a schema)."""
    pg_url = own_database
    worker = build_app(pg_url, lock_timeout=60.0)  # the poll net every 30 s: not in the window

    @worker.workflow
    async def patient(ctx: geste.WorkflowContext) -> str:
        try:
            return str((await ctx.wait_event("routing.early", timeout=1.0)).data)
        except geste.errors.EventTimeout:  # pragma: no cover - the event comes first
            return "timed out"

    named: list[str] = []
    caught_up: list[bool] = []  # the whole claims done, each: whether it began while the listener listened
    whole_claim = worker.storage.claim

    async def whole(*args: Any, **kwargs: Any) -> Any:
        listening = worker.listener_status().state == "listening"
        try:
            return await whole_claim(*args, **kwargs)
        finally:
            caught_up.append(listening)

    worker.storage.claim = whole  # type: ignore[method-assign]
    async with worker, build_app(pg_url, run_worker=False) as client:
        await wait_until(lambda: worker.listener_status().state == "listening", "the listener")
        # the listener's catch-up claim (a whole claim) is over before the wait begins: later, it took the
        # instance woken by the event, or read the wait's deadline as the database's next run_at, which
        # this worker (the only one) woke for, and claimed at (both under load)
        await wait_until(lambda: any(caught_up), "the catch-up claim after the listener connected")
        claim_ids = worker.storage.claim_ids

        async def counted(*args: Any, **kwargs: Any) -> Any:
            named.extend(args[3])
            return await claim_ids(*args, **kwargs)

        worker.storage.claim_ids = counted  # type: ignore[method-assign]
        handle = await worker.start_workflow("patient")  # runs here at once, then waits
        await wait_until(lambda: _waiting(pg_url, handle.instance_id), "the wait")
        deadline = time.monotonic() + 1.0
        await client.send_event("routing.early", "early", instance_id=handle.instance_id)
        assert await handle.result(timeout=10) == "early"
        before = await worker.metrics.snapshot()
        await asyncio.sleep(max(0.0, deadline - time.monotonic()) + 0.5)  # the deadline passes, unnoticed
        after = await worker.metrics.snapshot()
    assert named.count(handle.instance_id) == 1  # the event's wake-up, by id
    rounds = "geste_claim_rounds_total"
    assert after.value(rounds, cause="timer") == before.value(rounds, cause="timer")


async def _waiting(url: str, instance_id: str) -> bool:
    (found,) = await raw_query(url, "SELECT status FROM geste_instances WHERE instance_id = $1", instance_id)
    return bool(found["status"] == "waiting")


async def test_an_outbox_event_is_claimed_by_one_relay(own_database: str) -> None:
    """Three processes' relays (three Apps here, each its own listener): an event recorded by one is
    claimed by its own relay only (the others leave it to it); an event re-queued by a client, which
    names no worker, by exactly one relay. Before, every relay ran a (writing) claim per event."""
    pg_url = own_database
    delivered: list[str] = []

    async def handler(event: geste.OutboxEvent) -> None:
        delivered.append(event.event_id)

    claims: Counter[str] = Counter()
    apps = [
        build_app(pg_url, worker_id=f"r{n}", lock_timeout=3.0, outbox_handler=handler, outbox_max_attempts=1)
        for n in range(3)
    ]
    for app in apps:

        @app.workflow(name="emit")
        async def emit(ctx: geste.WorkflowContext, n: int) -> str:
            return await ctx.send_event("routing.emitted", {"n": n})

        real = app.storage.outbox_claim

        async def counted(*args: Any, real: Any = real, who: str = app.worker_id, **kwargs: Any) -> Any:
            found = await real(*args, **kwargs)
            claims[who] += 1
            return found

        app.storage.outbox_claim = counted  # type: ignore[method-assign]
    async with apps[0], apps[1], apps[2], build_app(pg_url, run_worker=False) as client:
        for app in apps:
            await wait_until(lambda: app.listener_status().state == "listening", "the listener")  # noqa: B023

        async def converged() -> bool:
            rows = await raw_query(pg_url, "SELECT listener, relay, heartbeat_at FROM geste_workers")
            return len(rows) == 3 and all(r["relay"] and "listening" in r["listener"] for r in rows)

        await wait_until(converged, "the relays to register")
        since = time.time()
        await wait_until(lambda: _beat_since(pg_url, since, 3), "every worker to read the others", timeout=10)
        before = Counter(claims)
        event_id = await (await apps[1].start_workflow("emit", 1)).result(timeout=10)
        await wait_until(lambda: event_id in delivered, "the delivery")
        assert claims - before == Counter({"r1": claims["r1"] - before["r1"]}), claims - before
        # a dead event re-queued by a client (no worker named): one relay claims it
        await raw_query(pg_url, "UPDATE geste_outbox SET status = 'dead' WHERE event_id = $1", event_id)
        before = Counter(claims)
        assert await client.retry_outbox_event(event_id)
        await wait_until(lambda: delivered.count(event_id) == 2, "the second delivery")
        assert sum((claims - before).values()) == 1, claims - before


async def _beat_since(url: str, since: float, count: int) -> bool:
    rows = await raw_query(url, "SELECT heartbeat_at FROM geste_workers")
    return len(rows) == count and all(r["heartbeat_at"] > since for r in rows)


@pytest.mark.parametrize("plan_cache_mode", ["force_custom_plan", "force_generic_plan"])
async def test_a_claim_by_ids_reads_the_rows_it_names_whatever_the_table_holds(
    pg_url: str, plan_cache_mode: str
) -> None:
    """EXPLAIN ANALYZE of ``claim_ids`` naming 3 due instances and 2 sleeping ones, over 100,000 due and
    100,000 sleeping instances of the same workflow: it finds them by primary key (no sequential scan, no
    walk of the runnable index: a custom plan walked it for the sleeping ones) and reads about the rows
    it names, with the custom plan and with the generic one a prepared statement switches to."""
    import asyncpg

    from geste.storage.postgres import parse_postgres_url, schema_queries

    dsn, options = parse_postgres_url(pg_url)
    now = time.time()
    async with geste.App(pg_url, run_worker=False):  # migrated
        conn = await asyncpg.connect(dsn, server_settings={"search_path": options["schema"]})
        try:
            await conn.execute(
                "INSERT INTO geste_instances (instance_id, workflow_name, status, input, created_at,"
                " updated_at, run_at) SELECT 'due-' || g, 'mine', 'waiting', '{}', $1 - 60, $1 - 60,"
                " $1 - 60 + g * 0.0001 FROM generate_series(1, 100000) AS g"
                " UNION ALL SELECT 'later-' || g, 'mine', 'waiting', '{}', $1 - 60, $1 - 60, $1 + 60 + g"
                " FROM generate_series(1, 100000) AS g",
                now,
            )
            await conn.execute("ANALYZE geste_instances")
            await conn.execute(f"SET plan_cache_mode = {plan_cache_mode}")
            named = [f"due-{g}" for g in (7, 700, 70000)] + [f"later-{g}" for g in (7, 70000)]
            # the last: the steps this worker holds of cached runs (a JSON object), here of one named
            params = ("w1", "0123456789ab/", now, now + 15.0, 5, now + 0.025, named, ["mine"], '{"due-7": 1}')
            arguments = ", ".join(sql_literal(value) for value in params)
            query = schema_queries(options["schema"])["claim_ids"]
            transaction = conn.transaction()
            await transaction.start()
            try:  # EXPLAIN ANALYZE runs the UPDATE: rolled back
                await conn.execute(f"PREPARE plan_under_test AS {query}")
                found = await conn.fetchval(
                    f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE plan_under_test({arguments})"
                )
            finally:
                await transaction.rollback()
                await conn.execute("DEALLOCATE ALL")
        finally:
            await conn.close()
    nodes = plan_nodes(json.loads(found)[0]["Plan"])
    on_table = [
        n for n in nodes if n.get("Relation Name") == "geste_instances" and n["Node Type"] != "ModifyTable"
    ]
    shown = [(n["Node Type"], n.get("Index Name"), instances_read([n])) for n in on_table]
    assert on_table and all(n.get("Index Name") == "geste_instances_pkey" for n in on_table), shown
    assert instances_read(nodes) <= 4 * len(named), shown  # picked, updated, the later ones: by key


async def test_a_claim_by_ids_reads_the_rows_it_names_on_sqlite(tmp_path: Path) -> None:
    """SQLite's claim by ids (``claim_ids_pick``, ``claim_ids_later``) searches the primary key, over a
    table of 50,000 instances of the same workflow, due and sleeping."""
    import sqlite3

    from geste.storage.sqlite import Q

    path = tmp_path / "seeded.db"
    async with geste.App(f"sqlite:///{path}", run_worker=False):  # migrated
        pass
    conn = sqlite3.connect(path)
    try:
        with conn:
            conn.execute(
                "INSERT INTO geste_instances (instance_id, workflow_name, status, input, created_at,"
                " updated_at, run_at) WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g"
                " WHERE n < 50000) SELECT 'i' || n, 'mine', 'waiting', '{}', 0, 0, n FROM g"
            )
        conn.execute("ANALYZE")
        params = {"ids": '["i1", "i49999"]', "names": '["mine"]', "due": 10.0, "now": 10.0, "limit": 2}
        for name in ("claim_ids_pick", "claim_ids_later"):
            plan = [r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + Q[name], params)]
            on_table = [step for step in plan if "geste_instances" in step]
            assert on_table == [
                "SEARCH geste_instances USING INDEX sqlite_autoindex_geste_instances_1 (instance_id=?)"
            ], (name, plan)
    finally:
        conn.close()


def instances_read(nodes: list[dict[str, Any]]) -> int:
    """Rows the plan took from geste_instances, kept or filtered out, over all its loops."""
    total = 0.0
    for node in nodes:
        if node.get("Relation Name") == "geste_instances" and node["Node Type"] != "ModifyTable":
            removed = node.get("Rows Removed by Filter", 0) + node.get("Rows Removed by Index Recheck", 0)
            total += (node["Actual Rows"] + removed) * node["Actual Loops"]
    return round(total)


async def test_only_a_timer_that_outlives_the_lease_is_announced(own_database: str) -> None:
    """A suspension announces its timer (geste_timer_expired, for the workers that watch it in case its
    keeper dies) only when it rings after the lease given up would have run out: the others learn of a
    death about a lease after the last heartbeat, so a note of a shorter timer is never used, and each
    notifying commit makes every listening backend of the database read the queue. The short sleep
    rings on time all the same (its keeper's local timer)."""
    pg_url = own_database
    heard: list[dict[str, Any]] = []
    other = await asyncpg.connect(pg_url)
    await other.add_listener(TIMER_EXPIRED, lambda *a: heard.append(json.loads(a[3])))
    worker = build_app(pg_url, lock_timeout=4.0)

    @worker.workflow
    async def napper(ctx: geste.WorkflowContext, seconds: float) -> float:
        await ctx.sleep(seconds)
        return seconds

    try:
        async with worker:
            await wait_until(lambda: worker.listener_status().state == "listening", "the listener")
            short = await worker.start_workflow("napper", 0.3)
            long = await worker.start_workflow("napper", 6.0)
            await wait_until(lambda: _waiting(pg_url, long.instance_id), "the long sleep's suspension")
            assert await short.result(timeout=10) == 0.3
            await other.execute("SELECT 1")  # notifications are read between statements
            assert [h["instance_id"] for h in heard] == [long.instance_id], heard
            assert heard[0]["worker"] == worker.worker_id and heard[0]["workflow_name"] == "napper"
            assert await long.result(timeout=20) == 6.0
    finally:
        await other.close()


def test_the_runner_separator_is_the_versions_one() -> None:
    """The router tells a runner from a name by the separator ``_versions`` puts between name and version
    (the runtime cannot import it: layers)."""
    from geste._versions import SEPARATOR, runner_key

    assert RUNNER_SEPARATOR == SEPARATOR
    assert runner_key("w", "v1", True) == f"w{RUNNER_SEPARATOR}v1"
