"""Plain ``def`` activities, on each backend: they run in the App's thread pool, with their retries,
timeouts and heartbeats, and a blocking one stalls neither the event loop nor the lease renewal."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import geste
from geste.errors import ActivityHeartbeatTimeout, ActivityTimeout, ConfigurationError

from .support import wait_until

ROOT = Path(__file__).resolve().parents[1]
FAST_RETRY = geste.RetryPolicy(max_attempts=3, initial_interval=0.01)


class Declined(Exception):
    """Not retried (a module-level class: a recorded error is rebuilt by its name)."""


async def test_a_def_activity_runs_in_a_thread_with_its_recorded_arguments(
    make_app: Callable[..., geste.App],
) -> None:
    app = make_app()
    threads: list[str] = []

    @app.activity
    def add(ctx: geste.ActivityContext, a: int, b: int = 0) -> int:
        threads.append(threading.current_thread().name)
        return a + b

    @app.workflow
    async def adding(ctx: geste.WorkflowContext, a: int) -> int:
        return await add(ctx, a, b=2)

    async with app:
        handle = await adding.start(40)
        assert await handle.result(timeout=30) == 42
        history = await app.history(handle.instance_id)
    assert [t.startswith("geste-activity") for t in threads] == [True]
    assert [e.payload["result"] for e in history if e.kind == geste.StepKind.ACTIVITY] == [42]


async def test_an_exception_in_a_def_activity_is_retried_like_an_async_ones(
    make_app: Callable[..., geste.App],
) -> None:
    app = make_app()
    attempts: dict[str, list[int]] = {"flaky": [], "declined": []}

    @app.activity(retry=FAST_RETRY)
    def flaky(ctx: geste.ActivityContext) -> int:
        attempts["flaky"].append(ctx.attempt)
        if ctx.attempt < 3:
            raise ValueError(f"attempt {ctx.attempt} failed")
        return ctx.attempt

    @app.activity(retry=geste.RetryPolicy(max_attempts=3, initial_interval=0.01, non_retryable=[Declined]))
    def declined(ctx: geste.ActivityContext) -> None:
        attempts["declined"].append(ctx.attempt)
        raise Declined("no")

    @app.workflow
    async def both(ctx: geste.WorkflowContext) -> list[Any]:
        out: list[Any] = [await flaky(ctx)]
        try:
            await declined(ctx)
        except Declined as exc:
            out.append(f"declined: {exc}")
        return out

    async with app:
        assert await (await both.start()).result(timeout=30) == [3, "declined: no"]
    assert attempts == {"flaky": [1, 2, 3], "declined": [1]}


async def test_a_def_activity_past_its_timeout_fails_and_its_late_result_is_ignored(
    make_app: Callable[..., geste.App],
) -> None:
    app = make_app()
    release, finished = threading.Event(), threading.Event()

    @app.activity(timeout=0.3, retry=FAST_RETRY)
    def slow(ctx: geste.ActivityContext) -> str:
        if ctx.attempt == 1:
            try:
                release.wait(30)  # blocks its thread past the timeout: the attempt fails meanwhile
                return "late"
            finally:
                finished.set()
        return f"attempt {ctx.attempt}"

    @app.workflow
    async def slow_flow(ctx: geste.WorkflowContext) -> str:
        return await slow(ctx)

    async with app:
        handle = await slow_flow.start()
        assert await handle.result(timeout=30) == "attempt 2"
        release.set()  # the first attempt's thread returns now: nobody takes its result
        await wait_until(finished.is_set, "the abandoned thread to return")
        await asyncio.sleep(0.05)
        history = await app.history(handle.instance_id)
    (step,) = [e for e in history if e.kind == geste.StepKind.ACTIVITY]
    assert (step.payload["result"], step.payload["attempts"]) == ("attempt 2", 2)


async def test_a_def_activity_that_times_out_every_attempt_fails_with_activity_timeout(
    make_app: Callable[..., geste.App],
) -> None:
    app = make_app()
    release = threading.Event()

    @app.activity(timeout=0.2, retry=geste.RetryPolicy(max_attempts=2, initial_interval=0))
    def stuck(ctx: geste.ActivityContext) -> None:
        release.wait(30)

    @app.workflow
    async def stuck_flow(ctx: geste.WorkflowContext) -> str:
        try:
            await stuck(ctx)
        except ActivityTimeout as exc:
            return type(exc).__name__
        return "unreachable"

    try:
        async with app:
            assert await (await stuck_flow.start()).result(timeout=30) == "ActivityTimeout"
    finally:
        release.set()


async def test_heartbeats_from_the_thread_keep_it_alive_and_reach_the_next_attempt(
    make_app: Callable[..., geste.App],
) -> None:
    app = make_app()
    seen: list[tuple[int, Any]] = []
    release = threading.Event()

    @app.activity(heartbeat_timeout=1.0, retry=FAST_RETRY)
    def alive(ctx: geste.ActivityContext) -> int:
        for i in range(15):  # 1.5 s, longer than the heartbeat timeout: kept alive by the heartbeats
            ctx.heartbeat(i)
            time.sleep(0.1)
        return ctx.attempt

    @app.activity(heartbeat_timeout=0.3, retry=FAST_RETRY)
    def hung(ctx: geste.ActivityContext) -> Any:
        seen.append((ctx.attempt, ctx.heartbeat_details))
        if ctx.attempt == 1:
            ctx.heartbeat({"row": 7})
            release.wait(30)  # hung without heartbeats: failed by the heartbeat timeout
            ctx.heartbeat({"row": 8})  # its attempt is over: ignored
        return ctx.heartbeat_details

    @app.workflow
    async def beating(ctx: geste.WorkflowContext) -> list[Any]:
        return [await alive(ctx), await hung(ctx)]

    try:
        async with app:
            assert await (await beating.start()).result(timeout=30) == [1, {"row": 7}]
    finally:
        release.set()
    assert seen == [(1, None), (2, {"row": 7})]


async def test_heartbeat_timeout_error_of_a_def_activity_is_typed(make_app: Callable[..., geste.App]) -> None:
    app = make_app()
    release = threading.Event()

    @app.activity(heartbeat_timeout=0.2, retry=geste.RetryPolicy(max_attempts=1))
    def hung(ctx: geste.ActivityContext) -> None:
        release.wait(30)

    @app.workflow
    async def hung_flow(ctx: geste.WorkflowContext) -> str:
        try:
            await hung(ctx)
        except ActivityHeartbeatTimeout:
            return "heartbeat timeout"
        return "unreachable"

    try:
        async with app:
            assert await (await hung_flow.start()).result(timeout=30) == "heartbeat timeout"
    finally:
        release.set()


async def test_the_pool_runs_at_most_activity_threads_at_once(make_app: Callable[..., geste.App]) -> None:
    app = make_app(activity_threads=2)
    lock = threading.Lock()
    running, most = [0], [0]

    @app.activity
    def work(ctx: geste.ActivityContext, i: int) -> int:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return i

    @app.workflow
    async def fan_out(ctx: geste.WorkflowContext) -> list[int]:
        return list(await asyncio.gather(*(work(ctx, i) for i in range(6))))

    async with app:
        assert await (await fan_out.start()).result(timeout=30) == list(range(6))
    assert most[0] == 2


STUCK_FOREVER = """
import asyncio, sys, threading
import geste

app = geste.App(sys.argv[1], lock_timeout=2.0, poll_interval=0.05, shutdown_grace=0.5)


@app.activity(timeout=0.2, retry=geste.RetryPolicy(max_attempts=1))
def stuck(ctx: geste.ActivityContext) -> None:
    threading.Event().wait()  # never returns: only the process's exit ends this thread


@app.workflow
async def stuck_flow(ctx: geste.WorkflowContext) -> str:
    try:
        await stuck(ctx)
    except geste.errors.ActivityTimeout:
        return "timed out"
    return "unreachable"


async def main() -> None:
    async with app:
        print(await (await stuck_flow.start()).result(timeout=30), flush=True)
    print("closed", flush=True)


asyncio.run(main())
"""


def test_a_def_activity_stuck_for_ever_does_not_hold_the_process_exit(db_url: str, tmp_path: Path) -> None:
    """The pool's threads are daemons: a thread that never returns does not keep a stopped worker alive."""
    script = tmp_path / "stuck.py"
    script.write_text(STUCK_FOREVER)
    done = subprocess.run(
        [sys.executable, str(script), db_url], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["timed", "out", "closed"]


async def test_def_activities_in_a_workflow_environment_and_their_fakes(tmp_path: Path) -> None:
    """geste.testing runs a def activity as the App does, and swaps fakes of either kind in and out."""
    from geste.testing import WorkflowEnvironment

    app = geste.App(f"sqlite:///{tmp_path / 'app.db'}")

    @app.activity
    def lookup(ctx: geste.ActivityContext, key: str) -> str:
        return f"real {key} in {threading.current_thread().name.rsplit('-', 1)[0]}"

    @app.workflow
    async def looking(ctx: geste.WorkflowContext, key: str) -> str:
        return await lookup(ctx, key)

    async def async_fake(ctx: geste.ActivityContext, key: str) -> str:
        return f"async fake {key}"

    def def_fake(ctx: geste.ActivityContext, key: str) -> str:
        return f"def fake {key}"

    async with WorkflowEnvironment(app) as env:
        assert await (await env.start(looking, "a")).result() == "real a in geste-activity"
    async with WorkflowEnvironment(app, activities={lookup: async_fake}) as env:
        assert await (await env.start(looking, "b")).result() == "async fake b"
    async with WorkflowEnvironment(app, activities={"lookup": def_fake}) as env:
        assert await (await env.start(looking, "c")).result() == "def fake c"
    assert lookup.fn.__name__ == "lookup" and not lookup.is_async  # given back as it was


@pytest.mark.parametrize("value", [0, -1, True, 2.5])
def test_a_bad_activity_threads_is_refused(value: Any) -> None:
    with pytest.raises(ConfigurationError, match="activity_threads"):
        geste.App("sqlite:///unused.db", activity_threads=value)


def test_a_def_workflow_is_still_refused() -> None:
    app = geste.App("sqlite:///unused.db")
    with pytest.raises(ConfigurationError, match="must be an `async def` function"):

        @app.workflow
        def plain(ctx: geste.WorkflowContext) -> int:  # type: ignore[arg-type, type-var]
            return 1


def test_a_def_activity_without_a_context_parameter_is_refused() -> None:
    app = geste.App("sqlite:///unused.db")
    with pytest.raises(ConfigurationError, match="context as first parameter"):

        @app.activity  # type: ignore[arg-type, type-var]
        def nothing() -> int:
            return 1


# -- the blocking call beside 100 running instances -------------------------------------------------
def _register(app: geste.App, hold: Callable[..., Any], block: Callable[..., Any]) -> tuple[Any, Any]:
    holding_activity = app.activity(name="hold")(hold)
    blocking_activity = app.activity(name="block")(block)

    @app.workflow
    async def holding(ctx: geste.WorkflowContext) -> int:
        return int(await holding_activity(ctx))

    @app.workflow
    async def blocking(ctx: geste.WorkflowContext) -> int:
        return int(await blocking_activity(ctx))

    return holding, blocking


def _watching_worker(app: geste.App, stop: threading.Event, ready: threading.Event, out: list[int]) -> None:
    """Another worker, on an event loop of its own in a thread: it takes over any lease that runs out."""

    async def serve() -> None:
        async with app:
            ready.set()
            while not stop.is_set():
                await asyncio.sleep(0.02)
            out.append(sum(app.metrics.lease_takeovers.values.values()))

    asyncio.run(serve())


async def _beside_100_running_instances(
    make_app: Callable[..., geste.App], block: Callable[..., Any], blocked: threading.Event
) -> tuple[int, int, int]:
    """Run ``block`` (blocking 2 s) while 100 instances hold leases of 0.6 s (renewed every 0.2 s) in this
    worker, with another worker (its own event loop, in a thread) ready to take over any lease that runs
    out. Returns the loop's turns while it blocked, and the take-overs here and in the other worker."""
    app = make_app(lock_timeout=0.6, concurrency=150)
    go = asyncio.Event()
    loop_turns = [0]

    async def hold(ctx: geste.ActivityContext) -> int:
        await go.wait()
        return 1

    holding, blocking = _register(app, hold, block)
    other = make_app(lock_timeout=0.6, concurrency=150, worker_id="other")

    async def hold_elsewhere(ctx: geste.ActivityContext) -> int:
        return 1

    def block_elsewhere(ctx: geste.ActivityContext) -> int:
        return 2

    _register(other, hold_elsewhere, block_elsewhere)
    stop, ready, taken_over_elsewhere = threading.Event(), threading.Event(), []

    async def ticker() -> None:
        while True:
            loop_turns[0] += 1
            await asyncio.sleep(0.05)

    async with app:
        holders = [await holding.start() for _ in range(100)]  # created claimed: they run here
        await wait_until(lambda: len(app._worker._running) >= 100, "100 running instances")  # type: ignore[union-attr]
        thread = threading.Thread(target=_watching_worker, args=(other, stop, ready, taken_over_elsewhere))
        thread.start()
        try:
            await wait_until(ready.is_set, "the other worker")
            tick = asyncio.create_task(ticker())
            handle = await blocking.start()
            await wait_until(blocked.is_set, "the activity to block")
            turns = loop_turns[0]
            assert await handle.result(timeout=30) == 2
            turns = loop_turns[0] - turns
            go.set()
            assert [await h.result(timeout=30) for h in holders] == [1] * 100
            tick.cancel()
        finally:
            stop.set()
            await asyncio.to_thread(thread.join, 60)
        takeovers = sum(app.metrics.lease_takeovers.values.values())
    return turns, takeovers, taken_over_elsewhere[0]


async def test_a_blocking_def_activity_beside_100_running_instances_loses_no_lease(
    make_app: Callable[..., geste.App], caplog: pytest.LogCaptureFixture
) -> None:
    """The def activity blocks its thread: the loop keeps turning, every lease is renewed, none is taken
    over, none lost."""
    caplog.set_level(logging.WARNING, logger="geste")
    blocked = threading.Event()

    def block(ctx: geste.ActivityContext) -> int:
        blocked.set()
        time.sleep(2.0)  # a blocking library call
        return 2

    turns, here, elsewhere = await _beside_100_running_instances(make_app, block, blocked)
    assert turns >= 10  # the loop kept turning while the thread blocked
    assert (here, elsewhere) == (0, 0)
    assert not [r for r in caplog.records if "lease lost" in r.getMessage()]


async def test_the_pitfall_a_blocking_call_in_an_async_def_activity_loses_the_leases(
    make_app: Callable[..., geste.App],
) -> None:
    """What docs/activities.md warns of: the same call in an ``async def`` activity stalls the event loop,
    the renewals with it; the leases run out and the other worker takes the instances over (and runs
    their activities again)."""
    blocked = threading.Event()

    async def block(ctx: geste.ActivityContext) -> int:
        blocked.set()
        time.sleep(2.0)  # the pitfall itself: a blocking call on the event loop
        return 2

    _turns, _here, elsewhere = await _beside_100_running_instances(make_app, block, blocked)
    assert elsewhere >= 1


# -- typing ---------------------------------------------------------------------------------------------
TYPED = """
from __future__ import annotations

import geste

app = geste.App("sqlite:///typed.db")


@app.activity
def add(ctx: geste.ActivityContext, a: int, b: int) -> int:
    return a + b


@app.activity(heartbeat_timeout=5, timeout=10)
def shout(ctx: geste.ActivityContext, text: str) -> str:
    ctx.heartbeat({"at": 1})
    return text.upper()


@app.activity
async def fetch(ctx: geste.ActivityContext, url: str) -> bytes:
    return b""


@app.activity(retry=geste.RetryPolicy(max_attempts=2))
async def fetch_twice(ctx: geste.ActivityContext, url: str) -> bytes:
    return b""


@app.workflow
async def flow(ctx: geste.WorkflowContext) -> str:
    reveal_type(await add(ctx, 1, 2))
    reveal_type(await shout(ctx, "x"))
    reveal_type(await fetch(ctx, "u"))
    reveal_type(await fetch_twice(ctx, "u"))
    await add(ctx, "one", 2)  # an error: a str for an int
    return "ok"
"""


def test_def_and_async_activities_type_check_as_returning_their_result(tmp_path: Path) -> None:
    """mypy --strict on a small file: ``await`` of either kind of activity gives the function's result."""
    source = tmp_path / "typed_activities.py"
    source.write_text(TYPED)
    config = tmp_path / "mypy.ini"
    config.write_text("[mypy]\nstrict = True\n\n[mypy-asyncpg.*]\nignore_missing_imports = True\n")
    found = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(config), "--cache-dir", str(tmp_path / "cache"),
         str(source)],
        cwd=tmp_path, capture_output=True, text=True, env={"MYPYPATH": str(ROOT / "src"), "PATH": ""},
        timeout=300,
    )  # fmt: skip
    lines = found.stdout.splitlines()
    revealed = [line.split("Revealed type is ")[1] for line in lines if "Revealed type is" in line]
    assert revealed == ['"int"', '"str"', '"bytes"', '"bytes"'], found.stdout
    errors = [line for line in lines if ": error:" in line]
    assert len(errors) == 1, found.stdout
    assert errors[0].startswith("typed_activities.py:36:") and 'type "str"; expected "int"' in errors[0]
