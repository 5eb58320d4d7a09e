"""Activities: retries and backoff, non-retryable errors, per-attempt timeouts, idempotency keys, JSON."""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import BaseModel

import geste
from geste.errors import (
    ActivityError,
    ActivityTimeout,
    GesteError,
    PayloadTooLargeError,
    SerializationError,
    WorkflowFailed,
)

MakeApp = Callable[..., geste.App]


class TransientError(Exception):
    pass


class FatalError(Exception):
    pass


class FatalSubclass(FatalError):
    pass


class Order(BaseModel):
    order_id: str
    amount: float
    placed_at: datetime


class Receipt(BaseModel):
    order_id: str
    total: float
    lines: list[str]


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def activity_entries(history: list[geste.HistoryEntry], name: str) -> list[geste.HistoryEntry]:
    return [e for e in history if e.kind == geste.StepKind.ACTIVITY and e.name == name]


def retry_delays(caplog: pytest.LogCaptureFixture) -> list[float]:
    """The delays the engine chose between attempts, as it logged them."""
    found = []
    for record in caplog.records:
        match = re.search(r"retrying in ([0-9.e+-]+)s", record.getMessage())
        if record.name == "geste.workflow" and match:
            found.append(float(match.group(1)))
    return found


@pytest.mark.pgbouncer  # also through PgBouncer (conftest)
async def test_retries_until_success_with_exponential_backoff(
    make_app: MakeApp, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="geste.workflow")
    policy = geste.RetryPolicy(max_attempts=5, initial_interval=0.02, backoff=2.0)
    attempts: list[tuple[int, int, float]] = []
    app = make_app()

    @app.activity(retry=policy)
    async def flaky(ctx: geste.ActivityContext) -> str:
        attempts.append((ctx.attempt, ctx.max_attempts, time.monotonic()))
        if ctx.attempt < 4:
            raise TransientError(f"attempt {ctx.attempt}")
        return "ok"

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> str:
        return await flaky(ctx)

    async with app:
        handle = await flow.start()
        assert await handle.result(timeout=10) == "ok"
        history = await handle.history()

    assert [(a, m) for a, m, _ in attempts] == [(1, 5), (2, 5), (3, 5), (4, 5)]
    expected = [policy.delay(n) for n in (1, 2, 3)]
    assert expected == pytest.approx([0.02, 0.04, 0.08])
    assert retry_delays(caplog) == pytest.approx(expected)
    gaps = [b[2] - a[2] for a, b in itertools.pairwise(attempts)]
    assert all(gap >= delay * 0.9 for gap, delay in zip(gaps, expected, strict=True)), gaps
    (entry,) = activity_entries(history, "flaky")
    assert not entry.is_error
    assert entry.payload["result"] == "ok"
    assert entry.payload["attempts"] == 4
    assert entry.payload["duration"] >= sum(expected) * 0.9


async def test_backoff_is_capped_by_max_interval(make_app: MakeApp, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="geste.workflow")
    policy = geste.RetryPolicy(max_attempts=4, initial_interval=0.01, backoff=10.0, max_interval=0.03)
    app = make_app()

    @app.activity(retry=policy)
    async def flaky(ctx: geste.ActivityContext) -> int:
        if ctx.attempt < 4:
            raise TransientError("again")
        return ctx.attempt

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> int:
        return await flaky(ctx)

    async with app:
        assert await (await flow.start()).result(timeout=10) == 4

    assert retry_delays(caplog) == pytest.approx([0.01, 0.03, 0.03])


async def test_gives_up_after_max_attempts_and_records_the_last_error(make_app: MakeApp) -> None:
    attempts: list[int] = []
    app = make_app()

    @app.activity(retry=geste.RetryPolicy(max_attempts=3, initial_interval=0.01))
    async def always_fails(ctx: geste.ActivityContext, what: str) -> None:
        attempts.append(ctx.attempt)
        raise TransientError(f"{what} failed on attempt {ctx.attempt}")

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> None:
        await always_fails(ctx, "sync")

    async with app:
        handle = await flow.start()
        with pytest.raises(WorkflowFailed) as failed:
            await handle.result(timeout=10)
        history = await handle.history()

    assert attempts == [1, 2, 3]
    assert failed.value.error["type"] == f"{__name__}.TransientError"
    assert failed.value.error["message"] == "sync failed on attempt 3"
    assert isinstance(failed.value.__cause__, TransientError)
    (entry,) = activity_entries(history, "always_fails")
    assert entry.is_error
    assert entry.payload["attempts"] == 3
    assert entry.payload["error"]["type"] == f"{__name__}.TransientError"
    assert entry.payload["error"]["message"] == "sync failed on attempt 3"
    assert entry.payload["input"] == {"args": ["sync"], "kwargs": {}}


@pytest.mark.parametrize(
    ("non_retryable", "raised"),
    [
        ([FatalError], FatalError),
        ([FatalError], FatalSubclass),
        (["FatalError"], FatalError),
        ([f"{__name__}.FatalError"], FatalSubclass),
        (("KeyError",), KeyError),
    ],
    ids=["class", "subclass-of-class", "plain-name", "dotted-name-of-base", "builtin-name"],
)
async def test_non_retryable_errors_fail_at_once(
    make_app: MakeApp, non_retryable: list[Any], raised: type[Exception]
) -> None:
    attempts: list[int] = []
    app = make_app()
    policy = geste.RetryPolicy(max_attempts=5, initial_interval=0.01, non_retryable=non_retryable)

    @app.activity(retry=policy)
    async def fragile(ctx: geste.ActivityContext) -> None:
        attempts.append(ctx.attempt)
        raise raised("broken")

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> str:
        try:
            await fragile(ctx)
        except Exception as exc:
            return type(exc).__name__
        return "no error"

    async with app:
        handle = await flow.start()
        assert await handle.result(timeout=10) == raised.__name__
        (entry,) = activity_entries(await handle.history(), "fragile")

    assert attempts == [1]
    assert entry.payload["attempts"] == 1


async def test_errors_not_listed_as_non_retryable_are_retried(make_app: MakeApp) -> None:
    attempts: list[int] = []
    app = make_app()
    policy = geste.RetryPolicy(max_attempts=3, initial_interval=0.01, non_retryable=[FatalError, "KeyError"])

    @app.activity(retry=policy)
    async def flaky(ctx: geste.ActivityContext) -> None:
        attempts.append(ctx.attempt)
        raise TransientError("retry me")

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> None:
        await flaky(ctx)

    async with app:
        with pytest.raises(WorkflowFailed):
            await (await flow.start()).result(timeout=10)

    assert attempts == [1, 2, 3]


@pytest.mark.pgbouncer  # also through PgBouncer (conftest)
@pytest.mark.parametrize("where", ["policy", "decorator"])
async def test_an_attempt_past_its_timeout_is_cut_and_retried(make_app: MakeApp, where: str) -> None:
    attempts: list[int] = []
    app = make_app()
    if where == "policy":
        options: dict[str, Any] = {
            "retry": geste.RetryPolicy(max_attempts=3, initial_interval=0.01, timeout=0.1)
        }
    else:
        options = {"retry": geste.RetryPolicy(max_attempts=3, initial_interval=0.01), "timeout": 0.1}

    @app.activity(**options)
    async def slow_then_fast(ctx: geste.ActivityContext) -> int:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            await asyncio.Event().wait()  # hangs: only the per-attempt timeout ends it
        return ctx.attempt

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> int:
        return await slow_then_fast(ctx)

    async with app:
        handle = await flow.start()
        assert await handle.result(timeout=10) == 2
        (entry,) = activity_entries(await handle.history(), "slow_then_fast")

    assert attempts == [1, 2]
    assert entry.payload["attempts"] == 2
    assert not entry.is_error


async def test_every_attempt_timing_out_raises_activity_timeout(make_app: MakeApp) -> None:
    attempts: list[int] = []
    app = make_app()

    @app.activity(
        retry=geste.RetryPolicy(max_attempts=2, initial_interval=0.01), timeout=timedelta(seconds=0.1)
    )
    async def hangs(ctx: geste.ActivityContext) -> None:
        attempts.append(ctx.attempt)
        await asyncio.Event().wait()

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> str:
        try:
            await hangs(ctx)
        except ActivityTimeout as exc:
            return f"timed out: {exc}"
        return "finished"

    async with app:
        handle = await flow.start()
        result = await handle.result(timeout=10)
        (entry,) = activity_entries(await handle.history(), "hangs")

    assert attempts == [1, 2]
    assert result.startswith("timed out: attempt 2 of activity hangs")
    assert entry.is_error
    assert entry.payload["error"]["type"] == "geste.errors.ActivityTimeout"


async def test_a_timeout_error_raised_by_the_activity_itself_is_not_an_activity_timeout(
    make_app: MakeApp,
) -> None:
    app = make_app()

    @app.activity(retry=geste.RetryPolicy(max_attempts=1), timeout=5)
    async def own_timeout(ctx: geste.ActivityContext) -> None:
        raise TimeoutError("the remote side timed out")

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> str:
        try:
            await own_timeout(ctx)
        except ActivityTimeout:
            return "activity timeout"
        except TimeoutError as exc:
            return f"{type(exc).__name__}: {exc}"
        return "no error"

    async with app:
        assert await (await flow.start()).result(timeout=10) == "TimeoutError: the remote side timed out"


@pytest.mark.pgbouncer  # also through PgBouncer (conftest)
async def test_idempotency_key_is_stable_across_retries_and_a_rerun_after_restart(make_app: MakeApp) -> None:
    """The first App stops while the activity runs (nothing recorded); the second runs it again."""
    seen: list[tuple[str, str, int]] = []
    started = asyncio.Event()
    hang = {"on": True}

    def register(app: geste.App) -> None:
        @app.activity(retry=geste.RetryPolicy(max_attempts=3, initial_interval=0.01))
        async def charge(ctx: geste.ActivityContext, amount: int) -> str:
            seen.append((ctx.activity_name, ctx.idempotency_key, ctx.attempt))
            if ctx.attempt == 1:
                raise TransientError("network")
            if hang["on"]:
                started.set()
                await asyncio.Event().wait()  # the App is closed meanwhile: this attempt is cut off
            return f"charged {amount}"

        @app.activity
        async def notify(ctx: geste.ActivityContext) -> str:
            seen.append((ctx.activity_name, ctx.idempotency_key, ctx.attempt))
            return ctx.idempotency_key

        @app.workflow
        async def flow(ctx: geste.WorkflowContext) -> list[str]:
            return [await charge(ctx, 5), await notify(ctx)]

    first_app = make_app(shutdown_grace=0.1)
    register(first_app)
    async with first_app:
        handle = await first_app.start_workflow("flow", instance_id="idem-1")
        await asyncio.wait_for(started.wait(), 10)
    assert await _history_len(make_app, "idem-1") == 0

    hang["on"] = False
    second_app = make_app()
    register(second_app)
    async with second_app:
        result = await second_app.get_handle(handle.instance_id).result(timeout=10)

    charge_keys = {key for name, key, _ in seen if name == "charge"}
    assert charge_keys == {"idem-1:1"}
    assert [attempt for name, _, attempt in seen if name == "charge"] == [1, 2, 1, 2]
    assert result == ["charged 5", "idem-1:2"]


async def _history_len(make_app: MakeApp, instance_id: str) -> int:
    app = make_app(run_worker=False)
    async with app:
        return len(await app.history(instance_id))


@pytest.mark.pgbouncer  # also through PgBouncer (conftest)
async def test_pydantic_models_round_trip_through_json_by_type_hints(make_app: MakeApp) -> None:
    received: list[Any] = []
    runs: list[Any] = []

    def register(app: geste.App) -> None:
        @app.activity
        async def bill(ctx: geste.ActivityContext, order: Order, extra: list[str]) -> Receipt:
            received.append(order)
            return Receipt(order_id=order.order_id, total=order.amount * 2, lines=extra)

        @app.workflow
        async def flow(ctx: geste.WorkflowContext, order: Order) -> Receipt:
            runs.append(order)
            receipt = await bill(ctx, order, ["a", "b"])
            runs.append(receipt)
            await ctx.wait_event("go")
            return receipt

    placed = datetime(2024, 5, 1, 12, 30, tzinfo=UTC)
    order = Order(order_id="ORD-1", amount=4.5, placed_at=placed)

    first_app = make_app()
    register(first_app)
    async with first_app:
        handle = await first_app.start_workflow("flow", order, instance_id="models-1")

        async def waiting() -> bool:
            return await handle.status() == geste.Status.WAITING

        await until(waiting)
        info = await handle.info()

    stored_order = {"order_id": "ORD-1", "amount": 4.5, "placed_at": "2024-05-01T12:30:00Z"}
    assert info.input == {"args": [stored_order], "kwargs": {}}
    assert received == [order]

    second_app = make_app()
    register(second_app)
    async with second_app:
        await second_app.send_event("go")
        result = await second_app.get_handle("models-1").result(timeout=10)
        (entry,) = activity_entries(await second_app.history("models-1"), "bill")

    expected = Receipt(order_id="ORD-1", total=9.0, lines=["a", "b"])
    assert received == [order], "the activity ran once; the replay used its recorded result"
    assert isinstance(result, Receipt) and result == expected
    # the workflow saw typed values in both runs: its input from JSON, the receipt from JSON
    assert [type(x) for x in runs] == [Order, Receipt, Order, Receipt]
    assert runs[2] == order and runs[2].placed_at == placed
    assert runs[3] == expected
    assert entry.payload["result"] == {"order_id": "ORD-1", "total": 9.0, "lines": ["a", "b"]}
    assert entry.payload["input"]["args"][1] == ["a", "b"]
    assert entry.payload["input"]["args"][0]["order_id"] == "ORD-1"


@pytest.mark.parametrize(
    ("value", "error_type", "app_options"),
    [
        (object(), SerializationError, {}),
        ({"n": float("nan")}, SerializationError, {}),
        ("x" * 5000, PayloadTooLargeError, {"max_payload_bytes": 1000}),
    ],
    ids=["object", "nan", "too-large"],
)
async def test_a_result_that_cannot_be_stored_is_recorded_as_an_error_without_retrying(
    make_app: MakeApp, value: Any, error_type: type[Exception], app_options: dict[str, Any]
) -> None:
    attempts: list[int] = []
    app = make_app(**app_options)

    @app.activity(retry=geste.RetryPolicy(max_attempts=3, initial_interval=0.01))
    async def bad_result(ctx: geste.ActivityContext) -> Any:
        attempts.append(ctx.attempt)
        return value

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> str:
        try:
            await bad_result(ctx)
        except GesteError as exc:
            return type(exc).__name__ if not isinstance(exc, ActivityError) else exc.type_name
        return "stored"

    async with app:
        handle = await flow.start()
        outcome = await handle.result(timeout=10)
        (entry,) = activity_entries(await handle.history(), "bad_result")

    assert attempts == [1]
    assert entry.is_error
    assert entry.payload["error"]["type"] == f"geste.errors.{error_type.__name__}"
    assert outcome.rpartition(".")[2] == error_type.__name__


async def test_arguments_that_cannot_be_stored_fail_the_call_before_the_activity_runs(
    make_app: MakeApp,
) -> None:
    calls: list[Any] = []
    app = make_app()

    @app.activity
    async def takes_anything(ctx: geste.ActivityContext, value: Any) -> None:
        calls.append(value)

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> str:
        try:
            await takes_anything(ctx, object())
        except SerializationError as exc:
            return f"refused: {exc}"
        return "ran"

    async with app:
        handle = await flow.start()
        result = await handle.result(timeout=10)
        history = await handle.history()

    assert result.startswith("refused: arguments of activity takes_anything cannot be stored as JSON")
    assert calls == []
    assert history == []


async def test_an_activity_gets_its_arguments_as_recorded_typed_by_its_hints(make_app: MakeApp) -> None:
    """Regression: the activity got the workflow's own objects, untyped (a dict where it declares a model)
    and shared (its mutation of a list leaked into the workflow, which a replay would not repeat)."""
    received: list[Any] = []
    app = make_app()

    @app.activity
    async def act(ctx: geste.ActivityContext, order: Order, items: list[int], when: datetime) -> int:
        received.append((order, when))
        items.append(99)
        return len(items)

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> list[Any]:
        items = [1, 2]
        stamp = "2024-05-01T12:30:00Z"
        raw = {"order_id": "A", "amount": 1.5, "placed_at": stamp}
        count = await act(ctx, raw, items, stamp)  # type: ignore[arg-type]
        try:
            await act(ctx, {"no": "order"}, items, stamp)  # type: ignore[arg-type]
        except SerializationError:
            refused = True
        else:
            refused = False
        return [count, items, refused]

    async with app:
        result = await (await flow.start()).result(timeout=10)

    placed = datetime(2024, 5, 1, 12, 30, tzinfo=UTC)
    assert result == [3, [1, 2], True]
    assert received == [(Order(order_id="A", amount=1.5, placed_at=placed), placed)]
