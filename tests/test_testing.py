"""geste.testing.WorkflowEnvironment: a frozen clock that only the test moves, timers fired in order at
once, retries' back-off skipped, and the user's App given back untouched.

Assertions are on the times geste recorded (``ctx.now()``, history rows), which the environment's clock
decides exactly; never on how long the test took.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import geste
from geste.testing import LEASE, WorkflowEnvironment

T0 = datetime(2030, 1, 1, tzinfo=UTC)


def exists(path: str | Path) -> bool:
    return Path(path).exists()


def user_app(tmp_path: Path, **options: Any) -> geste.App:
    """An App as a user's module would build it: on its own database file, never opened by these tests
    unless they say so."""
    return geste.App(f"sqlite:///{tmp_path / 'user.db'}", **options)


def renewal_app(tmp_path: Path) -> tuple[geste.App, geste.Workflow[..., dict[str, Any]]]:
    app = user_app(tmp_path)

    @app.workflow
    async def renewal(ctx: geste.WorkflowContext, customer: str) -> dict[str, Any]:
        started = ctx.now()
        await ctx.sleep(timedelta(days=3))
        woke = ctx.now()
        try:
            event = await ctx.wait_event("renewed", match={"customer": customer}, timeout=timedelta(weeks=1))
            outcome = event.data["plan"]
        except geste.errors.EventTimeout:
            outcome = "expired"
        return {"started": started, "woke": woke, "ended": ctx.now(), "outcome": outcome}

    return app, renewal


async def test_advance_fires_a_three_day_sleep_then_a_week_long_wait_timeout_at_once(tmp_path: Path) -> None:
    app, renewal = renewal_app(tmp_path)
    async with WorkflowEnvironment(app, start_at=T0) as env:
        handle = await env.start(renewal, "c-1")
        assert await handle.status() == geste.Status.WAITING  # start returns once it waits
        assert await env.next_wakeup() == T0 + timedelta(days=3)

        await env.advance(timedelta(days=3))
        assert env.now == T0 + timedelta(days=3)
        assert await handle.status() == geste.Status.WAITING  # now waiting for the event
        assert await env.next_wakeup() == T0 + timedelta(days=10)

        await env.advance(timedelta(days=6, hours=23, minutes=59))
        assert await handle.status() == geste.Status.WAITING  # a minute before the deadline
        await env.advance(timedelta(minutes=1))
        result = await handle.result(timeout=5)
        assert await env.next_wakeup() is None

        assert result["outcome"] == "expired"
        assert datetime.fromisoformat(result["started"]) == T0
        assert datetime.fromisoformat(result["woke"]) == T0 + timedelta(days=3)
        assert datetime.fromisoformat(result["ended"]) == T0 + timedelta(days=10)
        history = await handle.history()
        assert [(e.kind.value, e.name) for e in history] == [
            ("now", "now"),
            ("sleep", "sleep"),
            ("now", "now"),
            ("wait_event", "renewed"),
            ("event_timeout", "renewed"),
            ("now", "now"),
        ]
        assert [e.created_at for e in history] == [
            T0,
            T0,
            T0 + timedelta(days=3),
            T0 + timedelta(days=3),
            T0 + timedelta(days=10),
            T0 + timedelta(days=10),
        ]


async def test_an_event_sent_in_virtual_time_is_delivered_before_the_deadline(tmp_path: Path) -> None:
    app, renewal = renewal_app(tmp_path)
    async with WorkflowEnvironment(app, start_at=T0) as env:
        handle = await env.start(renewal, "c-2")
        await env.advance(timedelta(days=4))
        await env.send_event("renewed", {"customer": "c-2", "plan": "gold"})  # returns once it ran
        assert await handle.status() == geste.Status.COMPLETED
        result = await handle.result()
        assert result["outcome"] == "gold"
        assert datetime.fromisoformat(result["ended"]) == T0 + timedelta(days=4)


async def test_timers_fire_in_order_across_advance_calls(tmp_path: Path) -> None:
    app = user_app(tmp_path)
    fired: list[tuple[str, datetime]] = []

    @app.activity
    async def mark(ctx: geste.ActivityContext, label: str, at: datetime) -> None:
        fired.append((label, at))

    @app.workflow
    async def sleeper(ctx: geste.WorkflowContext, label: str, hours: list[float]) -> None:
        for n, h in enumerate(hours, 1):
            await ctx.sleep(timedelta(hours=h))
            await mark(ctx, f"{label}{n}", ctx.now())

    async with WorkflowEnvironment(app, start_at=T0) as env:
        await env.start(sleeper, "a", [5])
        await env.start(sleeper, "b", [1, 1, 1])  # wakes at 1h, 2h, 3h
        await env.start(sleeper, "c", [3])
        await env.start(sleeper, "d", [2.5, 0.5])  # 2.5h, then 3h: the same moment as b3 and c1

        await env.advance(timedelta(hours=2))
        assert fired == [("b1", T0 + timedelta(hours=1)), ("b2", T0 + timedelta(hours=2))]
        await env.advance(timedelta(minutes=30))
        assert fired[2:] == [("d1", T0 + timedelta(hours=2.5))]
        await env.advance(timedelta(hours=10))
        assert fired[:3] == [
            ("b1", T0 + timedelta(hours=1)),
            ("b2", T0 + timedelta(hours=2)),
            ("d1", T0 + timedelta(hours=2.5)),
        ]
        at_three = sorted(fired[3:6])  # three timers due at the same moment: fired together
        assert at_three == [(label, T0 + timedelta(hours=3)) for label in ("b3", "c1", "d2")]
        assert fired[6:] == [("a1", T0 + timedelta(hours=5))]
        assert env.now == T0 + timedelta(hours=12.5)
        done = await app.list_instances(status=geste.Status.COMPLETED)
        assert len(done) == 4


async def test_advance_skips_the_back_off_of_a_retrying_activity_in_order_with_other_timers(
    tmp_path: Path,
) -> None:
    app = user_app(tmp_path)
    attempts: list[tuple[int, datetime]] = []
    env_holder: list[WorkflowEnvironment] = []

    @app.activity(
        retry=geste.RetryPolicy(
            max_attempts=4, initial_interval=timedelta(minutes=10), backoff=2, max_interval=timedelta(hours=1)
        )
    )
    async def flaky(ctx: geste.ActivityContext) -> str:
        attempts.append((ctx.attempt, env_holder[0].now))
        if ctx.attempt < 3:
            raise ConnectionError("down")
        return "up"

    @app.activity
    async def mark(ctx: geste.ActivityContext, at: datetime) -> None:
        attempts.append((0, at))

    @app.workflow
    async def caller(ctx: geste.WorkflowContext) -> str:
        value = await flaky(ctx)
        await ctx.sleep(timedelta(hours=1))
        return value

    @app.workflow
    async def other(ctx: geste.WorkflowContext) -> None:
        await ctx.sleep(timedelta(minutes=20))
        await mark(ctx, ctx.now())

    async with WorkflowEnvironment(app, start_at=T0) as env:
        env_holder.append(env)
        handle = await env.start(caller)
        await env.start(other)
        # The instance waits out its back-off: it counts as waiting, and holds its lease.
        assert attempts == [(1, T0)]
        assert (await handle.info()).status == geste.Status.RUNNING
        assert await env.next_wakeup() == T0 + timedelta(minutes=10)

        await env.advance(timedelta(minutes=15))
        assert attempts == [(1, T0), (2, T0 + timedelta(minutes=10))]
        await env.advance(timedelta(days=1))  # far past every lease's lock_timeout of a real App
        assert attempts == [
            (1, T0),
            (2, T0 + timedelta(minutes=10)),
            (0, T0 + timedelta(minutes=20)),  # the other instance's timer, between two retries
            (3, T0 + timedelta(minutes=30)),
        ]
        assert await handle.result() == "up"
        (step, sleep, *_) = await handle.history()
        assert step.payload["attempts"] == 3
        assert step.payload["duration"] == 30 * 60.0
        assert sleep.created_at == T0 + timedelta(minutes=30)


async def test_a_retry_inside_a_gather_is_made_at_once(tmp_path: Path) -> None:
    app = user_app(tmp_path)
    calls: list[str] = []

    @app.activity(retry=geste.RetryPolicy(max_attempts=2, initial_interval=timedelta(hours=1)))
    async def flaky(ctx: geste.ActivityContext, name: str) -> str:
        calls.append(f"{name}{ctx.attempt}")
        if ctx.attempt == 1:
            raise ConnectionError("down")
        return name

    @app.workflow
    async def both(ctx: geste.WorkflowContext) -> list[str]:
        return list(await asyncio.gather(flaky(ctx, "a"), flaky(ctx, "b")))

    async with WorkflowEnvironment(app, start_at=T0) as env:
        handle = await env.start(both)
        assert await handle.result(timeout=5) == ["a", "b"]
        assert sorted(calls) == ["a1", "a2", "b1", "b2"]
        assert env.now == T0


async def test_result_moves_the_clock_from_timer_to_timer(tmp_path: Path) -> None:
    app, renewal = renewal_app(tmp_path)

    @app.workflow
    async def forever(ctx: geste.WorkflowContext) -> None:
        await ctx.sleep(60)
        await ctx.wait_event("never")

    async with WorkflowEnvironment(app, start_at=T0) as env:
        result = await env.result(await env.start(renewal, "c-3"))
        assert result["outcome"] == "expired"
        assert env.now == T0 + timedelta(days=10)

        stuck = await env.start(forever)
        with pytest.raises(geste.errors.ResultTimeout, match="no timer"):
            await env.result(stuck)
        assert env.now == T0 + timedelta(days=10, seconds=60)

        late = await env.start(renewal, "c-4")
        with pytest.raises(geste.errors.ResultTimeout, match="max_advance"):
            await env.result(late, max_advance=timedelta(days=1))


async def test_a_sub_millisecond_sleep_waits_for_advance_without_spinning(tmp_path: Path) -> None:
    app = user_app(tmp_path)

    @app.workflow
    async def short(ctx: geste.WorkflowContext) -> str:
        await ctx.sleep(0.0005)
        return ctx.now().isoformat()

    async with WorkflowEnvironment(app, start_at=T0) as env:
        handle = await env.start(short)
        assert await handle.status() == geste.Status.WAITING
        runs_before = env.app._worker.claimed if env.app._worker else 0
        await env.wait_until_idle()
        assert await handle.status() == geste.Status.WAITING
        assert env.app._worker is not None and env.app._worker.claimed == runs_before  # not claimed early
        await env.advance(0.0005)
        assert datetime.fromisoformat(await handle.result(timeout=5)) == T0 + timedelta(seconds=0.0005)


async def test_messages_and_cancellation_through_the_environment(tmp_path: Path) -> None:
    app = user_app(tmp_path)
    undone: list[str] = []

    @app.activity
    async def undo(ctx: geste.ActivityContext, what: str) -> None:
        undone.append(what)

    @app.activity
    async def do(ctx: geste.ActivityContext, what: str) -> str:
        return what

    @app.workflow
    async def listener(ctx: geste.WorkflowContext) -> list[Any]:
        await ctx.subscribe("news")
        first = await ctx.receive("news")
        second = await ctx.receive("direct")
        return [first.data, second.data]

    @app.workflow
    async def long(ctx: geste.WorkflowContext) -> None:
        await do(ctx, "x")
        ctx.on_failure(undo, "x")
        await ctx.sleep(timedelta(days=30))

    async with WorkflowEnvironment(app, start_at=T0) as env:
        handle = await env.start(listener)
        await env.publish("news", {"n": 1})
        await env.send_to(handle.instance_id, "direct", "hello")
        assert await handle.result(timeout=5) == [{"n": 1}, "hello"]

        slow = await env.start(long)
        info = await env.cancel(slow.instance_id)
        assert info.status == geste.Status.CANCELLED
        assert undone == ["x"]


async def test_activities_can_be_replaced_for_the_environment_only(tmp_path: Path) -> None:
    app = user_app(tmp_path)

    @app.activity
    async def charge(ctx: geste.ActivityContext, amount: float) -> str:
        raise AssertionError("the real payment service must not be called by the test")

    @app.activity
    async def receipt(ctx: geste.ActivityContext, charge_id: str) -> str:
        raise AssertionError("replaced by name")

    @app.workflow
    async def pay(ctx: geste.WorkflowContext, amount: float) -> str:
        return await receipt(ctx, await charge(ctx, amount))

    async def fake_charge(ctx: geste.ActivityContext, amount: float) -> str:
        return f"ch-{amount}-{ctx.attempt}"

    async def fake_receipt(ctx: geste.ActivityContext, charge_id: str) -> str:
        return f"receipt for {charge_id}"

    original = charge.fn
    async with WorkflowEnvironment(app, activities={charge: fake_charge, "receipt": fake_receipt}) as env:
        handle = await env.start(pay, 9.5)
        assert await handle.result(timeout=5) == "receipt for ch-9.5-1"
    assert charge.fn is original and receipt.fn is not fake_receipt

    with pytest.raises(geste.errors.ConfigurationError, match="no activity named 'refund'"):
        async with WorkflowEnvironment(app, activities={"refund": fake_charge}):
            pass
    with pytest.raises(geste.errors.ConfigurationError, match="must be a function"):  # def fakes run too
        async with WorkflowEnvironment(app, activities={charge: "not a function"}):  # type: ignore[dict-item]
            pass


async def test_the_users_app_is_given_back_unchanged_and_still_works(tmp_path: Path) -> None:
    app = user_app(tmp_path)

    @app.activity
    async def hello(ctx: geste.ActivityContext) -> str:
        return "hello"

    @app.workflow
    async def greet(ctx: geste.WorkflowContext) -> str:
        return await hello(ctx)

    parts = (
        "url",
        "storage",
        "clock",
        "metrics",
        "client",
        "runtime",
        "registry",
        "worker_id",
        "lock_timeout",
    )
    before = {name: getattr(app, name) for name in parts}
    workflows, activities = app.workflows, app.activities
    async with WorkflowEnvironment(app, start_at=T0) as env:
        assert app.url != before["url"] and app.clock() == T0.timestamp()
        assert app.storage is not before["storage"] and app.runtime is not before["runtime"]
        assert app.registry is before["registry"]
        # the environment swapped one object: the App's settings are untouched, its runtime has its own
        assert app.lock_timeout == before["lock_timeout"] and app.runtime.options.lock_timeout == LEASE
        assert app.runtime.options.worker_id == "geste-testing" and app.worker_id == before["worker_id"]
        assert (await greet.start()) is not None  # the workflow's own start() goes to the test database
        await env.wait_until_idle()
        assert len(await app.list_instances()) == 1
        test_db = env.database_url.removeprefix("sqlite:///")
        assert exists(test_db)
    assert not exists(test_db)  # the temporary database is gone
    assert all(getattr(app, name) is value for name, value in before.items())
    assert app.workflows == workflows and app.activities == activities
    assert not exists(tmp_path / "user.db")  # the user's own database was never touched

    async with app:  # and it runs on its own database, with the real clock, as before
        assert await (await greet.start()).result(timeout=10) == "hello"
        assert await app.list_instances() != []


async def test_an_open_app_or_a_second_entry_is_refused(tmp_path: Path) -> None:
    app, _ = renewal_app(tmp_path)
    async with app:
        with pytest.raises(geste.errors.ConfigurationError, match="the App is open"):
            async with WorkflowEnvironment(app):
                pass
    env = WorkflowEnvironment(app)
    async with env:
        pass
    with pytest.raises(geste.errors.ConfigurationError, match="opened once"):
        await env.open()
    with pytest.raises(geste.errors.ConfigurationError, match="not open"):
        await env.advance(1)
    with pytest.raises(geste.errors.ConfigurationError):
        WorkflowEnvironment(app, start_at="2030-01-01")  # type: ignore[arg-type]


async def test_a_run_that_never_ends_is_reported_after_the_idle_timeout(tmp_path: Path) -> None:
    app = user_app(tmp_path)
    never = asyncio.Event()

    @app.activity
    async def hang(ctx: geste.ActivityContext) -> None:
        await never.wait()

    @app.workflow
    async def stuck(ctx: geste.WorkflowContext) -> None:
        await hang(ctx)

    async with WorkflowEnvironment(app, idle_timeout=0.3) as env:
        with pytest.raises(geste.errors.IdleTimeout, match="still busy: running stuck-1"):
            await env.start_with_id(stuck, "stuck-1")
        with pytest.raises(geste.errors.ConfigurationError, match="back in time"):
            await env.advance_to(env.now - timedelta(seconds=1))


async def test_an_open_app_refuses_to_swap_what_it_runs_on(tmp_path: Path) -> None:
    app = user_app(tmp_path)
    async with app:
        with pytest.raises(geste.errors.ConfigurationError, match="close it"):
            app._swap(app._parts)
        with pytest.raises(geste.errors.ConfigurationError, match="close it"):
            async with WorkflowEnvironment(app):
                pass
        assert app.is_open and app.url.endswith("user.db")
