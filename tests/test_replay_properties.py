"""Property-based tests of the replay engine (hypothesis).

A random program (a list of steps: activities, sleeps, waits for events, ``now``/``uuid4``/``random``) is
run by one generic workflow, twice on fresh databases: once without interruption, once closed and
reopened (a new ``App`` object on the same database, the same registrations) at chosen points: while it
sleeps, while it waits for an event, or while an activity is running. The resumed run must give the same
result and the same history as the uninterrupted one, record every activity exactly once and execute it
no more often than the interruptions allow.

Nothing really waits: a ``MovableClock`` drives the sleeps and event timeouts, the test sends the events,
and every wait is for a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import tempfile
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import geste

from .conftest import POSTGRES_URL, _admin, with_query
from .support import MovableClock, wait_until

INSTANCE = "prop-1"
EVENT_TIMEOUT = 600.0
HELPERS = ("now", "uuid", "random")
TIME_KEYS = {"started_at", "duration", "expires_at", "deadline", "time"}


class Boom(Exception):
    """The deterministic failure of an activity (non-retryable)."""


# -- programs --------------------------------------------------------------------------------------

act_steps = st.fixed_dictionaries(
    {
        "k": st.just("act"),
        "x": st.integers(0, 99),
        "attempts": st.integers(1, 3),  # fails (retryably) on every attempt before this one
        "fail": st.booleans(),  # then fails for good (caught by the workflow)
        "interrupt": st.booleans(),  # the interrupted run is closed while this activity runs
    }
)
sleep_steps = st.fixed_dictionaries(
    {"k": st.just("sleep"), "seconds": st.integers(1, 7200), "interrupt": st.booleans()}
)
wait_steps = st.fixed_dictionaries(
    {
        "k": st.just("wait"),
        "how": st.sampled_from(["event", "early", "timeout"]),  # sent while it waits, before, or never
        "interrupt": st.booleans(),
    }
)
helper_steps = st.fixed_dictionaries(
    {"k": st.just("helper"), "kind": st.sampled_from(HELPERS), "echo": st.booleans()}
)
programs = st.lists(st.one_of(act_steps, sleep_steps, wait_steps, helper_steps), min_size=1, max_size=8)


# -- the workflow and its activities -----------------------------------------------------------------


@dataclass
class Probe:
    """What the activities did in one run (across its App objects)."""

    interrupted: bool
    calls: list[tuple[str, int, int]] = field(default_factory=list)  # (activity, step, attempt)
    entered: dict[int, asyncio.Event] = field(default_factory=dict)
    blocked: set[int] = field(default_factory=set)

    def executions(self, activity: str, step: int) -> int:
        return sum(1 for name, i, attempt in self.calls if (name, i, attempt) == (activity, step, 1))


def register(app: geste.App, probe: Probe) -> None:
    retry = geste.RetryPolicy(max_attempts=3, initial_interval=0.001, backoff=1.0, non_retryable=[Boom])

    @app.activity(retry=retry)
    async def compute(
        ctx: geste.ActivityContext, i: int, x: int, acc: int, attempts: int, fail: bool, block: bool
    ) -> int:
        probe.calls.append(("compute", i, ctx.attempt))
        if block and probe.interrupted and i not in probe.blocked:
            probe.blocked.add(i)  # the first execution of this step hangs until the App is closed
            probe.entered.setdefault(i, asyncio.Event()).set()
            await asyncio.get_running_loop().create_future()
        if ctx.attempt < attempts:
            raise ConnectionError(f"flaky {i} attempt {ctx.attempt}")
        if fail:
            raise Boom(f"boom {i} {x}")
        return (x * 7 + acc * 3 + i) % 1009

    @app.activity(retry=retry)
    async def echo(ctx: geste.ActivityContext, i: int, value: str) -> str:
        probe.calls.append(("echo", i, ctx.attempt))
        return value

    @app.workflow
    async def flow(ctx: geste.WorkflowContext, program: list[dict[str, Any]]) -> dict[str, Any]:
        out: list[list[Any]] = []
        acc = 0
        for i, step in enumerate(program):
            if step["k"] == "act":
                try:
                    value = await compute(
                        ctx, i, step["x"], acc, step["attempts"], step["fail"], step["interrupt"]
                    )
                except Exception as exc:
                    out.append(["act-error", type(exc).__name__, str(exc)])
                    acc = (acc + 1) % 1009
                else:
                    out.append(["act", value])
                    acc = (acc * 31 + value) % 1009
            elif step["k"] == "sleep":
                await ctx.sleep(step["seconds"])
                out.append(["sleep", step["seconds"]])
            elif step["k"] == "wait":
                timeout = EVENT_TIMEOUT if step["how"] == "timeout" else None
                try:
                    event = await ctx.wait_event(f"ev{i}", timeout=timeout)
                except geste.errors.EventTimeout:
                    out.append(["event-timeout"])
                else:
                    out.append(["event", event.event_id, event.data])
                    acc = (acc + event.data["n"]) % 1009
            else:
                helper: Any
                if step["kind"] == "now":
                    helper = ctx.now().timestamp()
                elif step["kind"] == "uuid":
                    helper = str(ctx.uuid4())
                else:
                    helper = ctx.random()
                out.append([step["kind"], helper])
                if step["echo"]:
                    out.append(["echo", await echo(ctx, i, repr(helper))])
        return {"out": out, "acc": acc}


# -- running a program -------------------------------------------------------------------------------


@dataclass
class Run:
    result: dict[str, Any]
    history: list[geste.HistoryEntry]
    probe: Probe
    restarts: int


async def run_program(url: str, program: list[dict[str, Any]], *, interrupted: bool) -> Run:
    clock = MovableClock()
    probe = Probe(interrupted)
    restarts = 0

    def new_app() -> geste.App:
        app = geste.App(
            url, clock=clock, poll_interval=0.02, lock_timeout=5.0, shutdown_grace=0.05, listen_notify=False
        )
        register(app, probe)
        return app

    async def restart(app: geste.App) -> geste.App:
        nonlocal restarts
        await app.close()
        restarts += 1
        fresh = new_app()
        await fresh.open()
        return fresh

    async def parked(app: geste.App, at: Any) -> None:
        async def check() -> bool:
            if (await app.get_instance(INSTANCE)).status != geste.Status.WAITING:
                return False
            return bool(at(await app.history(INSTANCE)))

        await wait_until(check, "the instance to be parked", timeout=15)

    app = new_app()
    await app.open()
    try:
        await app.start_workflow("flow", program, instance_id=INSTANCE)
        for i, step in enumerate(program):
            if step["k"] == "wait" and step["how"] == "early":
                await app.send_event(f"ev{i}", {"n": i}, event_id=f"e{i}")
        sleeps = 0
        for i, step in enumerate(program):
            if step["k"] == "act" and step["interrupt"] and interrupted:
                entered = probe.entered.setdefault(i, asyncio.Event())
                await asyncio.wait_for(entered.wait(), timeout=15)
                app = await restart(app)
            elif step["k"] == "sleep":
                sleeps += 1
                n = sleeps
                await parked(app, lambda h, n=n: sum(e.kind == geste.StepKind.SLEEP for e in h) == n)
                if step["interrupt"] and interrupted:
                    app = await restart(app)
                clock.advance(step["seconds"] + 1)
            elif step["k"] == "wait" and step["how"] != "early":
                name = f"ev{i}"
                await parked(
                    app,
                    lambda h, name=name: any(
                        e.kind == geste.StepKind.WAIT_EVENT and e.name == name for e in h
                    ),
                )
                if step["interrupt"] and interrupted:
                    app = await restart(app)
                if step["how"] == "timeout":
                    clock.advance(EVENT_TIMEOUT + 1)
                else:
                    await app.send_event(name, {"n": i}, event_id=f"e{i}")
        result = await app.get_handle(INSTANCE).result(timeout=15)
        history = await app.history(INSTANCE)
    finally:
        await app.close()
    return Run(result, history, probe, restarts)


# -- what must hold ------------------------------------------------------------------------------------


def stable(value: Any) -> Any:
    """A payload without what depends on the clock."""
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items() if k not in TIME_KEYS}
    if isinstance(value, list):
        return [stable(v) for v in value]
    return value


def shape(run: Run) -> list[tuple[str, str, bool, Any]]:
    """The history's kinds, names and error flags in order, with the payloads that depend on neither
    time nor randomness."""
    rows = []
    for e in run.history:
        payload = stable(e.payload)
        if e.kind in HELPERS or e.name == "echo":
            payload = None  # random by design: checked against the result instead
        rows.append((str(e.kind), e.name, e.is_error, payload))
    return rows


def without_randomness(result: dict[str, Any]) -> dict[str, Any]:
    return {
        **result,
        "out": [[e[0], "*"] if e[0] in (*HELPERS, "echo") else e for e in result["out"]],
    }


def check_run(run: Run, program: list[dict[str, Any]]) -> None:
    """What holds within one run: the values the workflow saw are the recorded ones; each activity is
    recorded once, with the attempts the program asked for, and executed as often as interrupted."""
    out = run.result["out"]
    helpers_seen = [e for e in out if e[0] in HELPERS]
    helpers_recorded = [e for e in run.history if e.kind in HELPERS]
    assert [str(e.kind) for e in helpers_recorded] == [h[0] for h in helpers_seen]
    for seen, entry in zip(helpers_seen, helpers_recorded, strict=True):
        if seen[0] == "now":
            assert seen[1] == pytest.approx(entry.payload, abs=1e-5)
        else:
            assert seen[1] == entry.payload
    echoed = [e[1] for e in out if e[0] == "echo"]
    echo_sources = [repr(out[j - 1][1]) for j, e in enumerate(out) if e[0] == "echo"]
    assert echoed == echo_sources

    recorded = Counter(
        (e.name, e.payload["input"]["args"][0]) for e in run.history if e.kind == geste.StepKind.ACTIVITY
    )
    expected = Counter(("compute", i) for i, s in enumerate(program) if s["k"] == "act")
    expected.update(("echo", i) for i, s in enumerate(program) if s["k"] == "helper" and s["echo"])
    assert recorded == expected, "each activity step is recorded exactly once"

    for e in run.history:
        if e.kind == geste.StepKind.ACTIVITY and e.name == "compute":
            step = program[e.payload["input"]["args"][0]]
            assert e.payload["attempts"] == step["attempts"]
            assert e.is_error == step["fail"]
    for name, i in expected:
        step = program[i]
        interrupted_here = run.probe.interrupted and name == "compute" and step["interrupt"]
        assert run.probe.executions(name, i) == 1 + interrupted_here, (name, i)


async def compare(make_url: Any, program: list[dict[str, Any]]) -> None:
    plain = await run_program(await make_url(), program, interrupted=False)
    resumed = await run_program(await make_url(), program, interrupted=True)
    assert plain.restarts == 0
    assert resumed.restarts == sum(
        bool(s.get("interrupt")) and (s["k"] != "wait" or s["how"] != "early") for s in program
    )
    check_run(plain, program)
    check_run(resumed, program)
    assert without_randomness(resumed.result) == without_randomness(plain.result)
    assert shape(resumed) == shape(plain)


# -- the properties ----------------------------------------------------------------------------------


def sqlite_urls(folder: Path) -> Any:
    async def make() -> str:
        return f"sqlite:///{folder / f'{uuid.uuid4().hex}.db'}"

    return make


@settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(program=programs)
@example(
    program=[
        {"k": "act", "x": 1, "attempts": 2, "fail": False, "interrupt": True},
        {"k": "helper", "kind": "uuid", "echo": True},
        {"k": "sleep", "seconds": 60, "interrupt": True},
        {"k": "wait", "how": "event", "interrupt": True},
        {"k": "helper", "kind": "now", "echo": False},
        {"k": "wait", "how": "timeout", "interrupt": True},
        {"k": "wait", "how": "early", "interrupt": False},
        {"k": "act", "x": 2, "attempts": 1, "fail": True, "interrupt": True},
        {"k": "helper", "kind": "random", "echo": True},
    ]
)
def test_an_interrupted_run_replays_to_the_same_result_and_history_sqlite(
    program: list[dict[str, Any]],
) -> None:
    with tempfile.TemporaryDirectory(prefix="geste-prop-") as folder:
        asyncio.run(compare(sqlite_urls(Path(folder)), program))


@settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(program=programs)
def test_an_interrupted_run_replays_to_the_same_result_and_history_postgres(
    program: list[dict[str, Any]],
) -> None:
    schemas: list[str] = []

    async def make() -> str:
        schema = f"t_{uuid.uuid4().hex[:12]}"
        await asyncio.to_thread(_admin, f'CREATE SCHEMA "{schema}"')
        schemas.append(schema)
        return with_query(POSTGRES_URL, schema=schema)

    try:
        asyncio.run(compare(make, program))
    finally:
        for schema in schemas:
            _admin(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
