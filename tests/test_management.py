"""Managing instances: starting by id, results, status, listing, cancelling, history, errors, options."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import pytest

import geste
from geste.errors import (
    AppNotOpenError,
    ConfigurationError,
    InstanceAlreadyExistsError,
    InstanceNotFoundError,
    ResultTimeout,
    SerializationError,
    UnknownWorkflowError,
    WorkflowCancelled,
    WorkflowFailed,
)

from .support import wait_status, wait_until

MakeApp = Callable[..., geste.App]


class InvoiceRejected(Exception):
    pass


# -- starting by id ------------------------------------------------------------------------------------
async def test_starting_an_existing_id_returns_the_instance_and_it_runs_once(make_app: MakeApp) -> None:
    calls: list[int] = []
    app = make_app()

    @app.activity
    async def work(ctx: geste.ActivityContext, n: int) -> int:
        calls.append(n)
        return n * 10

    @app.workflow
    async def flow(ctx: geste.WorkflowContext, n: int) -> int:
        return await work(ctx, n)

    async with app:
        first = await flow.start_with_id("order-1", 1)
        assert first.created
        assert await first.result(timeout=10) == 10
        again = await flow.start_with_id("order-1", 2)
        by_name = await app.start_workflow("flow", 3, instance_id="order-1")
        assert not again.created and not by_name.created
        assert again == first and by_name.instance_id == "order-1"
        assert await again.result(timeout=10) == 10
        info = await app.get_instance("order-1")

    assert calls == [1]
    assert info.input == {"args": [1], "kwargs": {}}


async def test_concurrent_starts_of_one_id_create_it_once(make_app: MakeApp) -> None:
    calls: list[str] = []
    apps = [make_app(), make_app()]
    for app in apps:

        @app.activity(name="work")
        async def work(ctx: geste.ActivityContext) -> str:
            calls.append(ctx.instance_id)
            return "done"

        @app.workflow(name="flow")
        async def flow(ctx: geste.WorkflowContext) -> str:
            return await work(ctx)

    async with apps[0], apps[1]:
        handles = await asyncio.gather(
            *(app.start_workflow("flow", instance_id="same-id") for app in apps for _ in range(4))
        )
        assert sorted(handle.created for handle in handles) == [False] * 7 + [True]
        results = await asyncio.gather(*(handle.result(timeout=10) for handle in handles))

    assert results == ["done"] * 8
    assert calls == ["same-id"]


async def test_an_existing_id_of_another_workflow_is_refused(make_app: MakeApp) -> None:
    app = make_app()

    @app.workflow
    async def first(ctx: geste.WorkflowContext) -> str:
        return "first"

    @app.workflow
    async def second(ctx: geste.WorkflowContext) -> str:
        return "second"

    async with app:
        handle = await first.start_with_id("shared")
        with pytest.raises(InstanceAlreadyExistsError, match="shared"):
            await second.start_with_id("shared")
        assert await handle.result(timeout=10) == "first"
        assert (await app.get_instance("shared")).workflow_name == "first"


async def test_starting_checks_the_workflow_and_its_arguments(make_app: MakeApp) -> None:
    app = make_app()

    @app.workflow
    async def flow(ctx: geste.WorkflowContext, n: int) -> int:
        return n

    async with app:
        with pytest.raises(UnknownWorkflowError):
            await app.start_workflow("nope")
        with pytest.raises(SerializationError):
            await flow.start()  # type: ignore[call-arg]
        with pytest.raises(SerializationError):
            await flow.start(object())  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError):
            await flow.start_with_id("", 1)
        assert await app.list_instances() == []


# -- results and status --------------------------------------------------------------------------------
async def test_result_with_a_timeout_raises_result_timeout_and_the_instance_goes_on(
    make_app: MakeApp,
) -> None:
    app = make_app()

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> Any:
        return (await ctx.wait_event("go")).data

    async with app:
        handle = await flow.start()
        with pytest.raises(ResultTimeout):
            await handle.result(timeout=0.1)
        with pytest.raises(TimeoutError):
            await handle.result(timeout=timedelta(milliseconds=50))
        await app.send_event("go", "went")
        assert await handle.result(timeout=10) == "went"


async def test_status_follows_the_instance(make_app: MakeApp) -> None:
    entered, opened = asyncio.Event(), asyncio.Event()
    app = make_app()

    @app.activity
    async def gate(ctx: geste.ActivityContext) -> None:
        entered.set()
        await opened.wait()

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> str:
        await gate(ctx)
        await ctx.wait_event("go")
        return "ok"

    async with app:
        handle = await flow.start()
        await asyncio.wait_for(entered.wait(), 10)
        info = await handle.info()
        assert info.status == geste.Status.RUNNING
        assert info.locked_by == app.worker_id and info.lock_expires_at is not None
        opened.set()
        await wait_status(app, handle.instance_id, geste.Status.WAITING)
        await app.send_event("go")
        assert await handle.result(timeout=10) == "ok"
        info = await handle.info()

    assert info.status == geste.Status.COMPLETED
    assert info.result == "ok" and info.error is None
    assert info.finished_at is not None and info.locked_by is None
    assert info.steps == 3


async def test_a_pending_instance_is_pending(make_app: MakeApp) -> None:
    app = make_app(run_worker=False)

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> None:
        return None

    async with app:
        handle = await flow.start()
        assert await handle.status() == geste.Status.PENDING
        with pytest.raises(ResultTimeout):
            await handle.result(timeout=0.05)


async def test_workflow_failed_carries_the_type_message_and_traceback(make_app: MakeApp) -> None:
    app = make_app()

    @app.workflow
    async def flow(ctx: geste.WorkflowContext, amount: int) -> None:
        raise InvoiceRejected(f"amount {amount} over the limit")

    async with app:
        handle = await flow.start(99)
        with pytest.raises(WorkflowFailed) as failed:
            await handle.result(timeout=10)
        info = await handle.info()

    error = failed.value.error
    assert failed.value.instance_id == handle.instance_id
    assert error["type"] == f"{__name__}.InvoiceRejected"
    assert error["message"] == "amount 99 over the limit"
    assert 'raise InvoiceRejected(f"amount {amount} over the limit")' in error["traceback"]
    assert "InvoiceRejected: amount 99 over the limit" in error["traceback"]
    assert isinstance(failed.value.__cause__, InvoiceRejected)
    assert str(failed.value.__cause__) == "amount 99 over the limit"
    assert info.status == geste.Status.FAILED and info.error == error


# -- listing -------------------------------------------------------------------------------------------
async def test_list_instances_filters_by_workflow_and_status_and_pages(make_app: MakeApp) -> None:
    app = make_app(run_worker=False)

    @app.workflow
    async def alpha(ctx: geste.WorkflowContext) -> None:
        return None

    @app.workflow
    async def beta(ctx: geste.WorkflowContext) -> None:
        return None

    async with app:
        alphas = [(await alpha.start()).instance_id for _ in range(5)]
        betas = [(await beta.start()).instance_id for _ in range(3)]
        for instance_id in alphas[:2] + betas[:1]:
            await app.cancel(instance_id)

        everything = await app.list_instances()
        assert {i.instance_id for i in everything} == set(alphas + betas)
        stamps = [(i.created_at, i.instance_id) for i in everything]
        assert stamps == sorted(stamps, reverse=True)

        assert {i.instance_id for i in await app.list_instances(workflow="alpha")} == set(alphas)
        cancelled = await app.list_instances(status=geste.Status.CANCELLED)
        assert {i.instance_id for i in cancelled} == {*alphas[:2], betas[0]}
        pending_alpha = await app.list_instances(workflow="beta", status="pending")
        assert {i.instance_id for i in pending_alpha} == set(betas[1:])
        assert await app.list_instances(workflow="gamma") == []

        pages = [await app.list_instances(limit=3, offset=offset) for offset in (0, 3, 6, 9)]
        assert [len(page) for page in pages] == [3, 3, 2, 0]
        assert [i.instance_id for page in pages for i in page] == [i.instance_id for i in everything]

        for bad in ({"status": "sleeping"}, {"limit": 0}, {"limit": 10_001}, {"offset": -1}):
            with pytest.raises(ConfigurationError):
                await app.list_instances(**bad)


# -- cancelling ----------------------------------------------------------------------------------------
async def test_cancelling_a_pending_instance_cancels_it_at_once(make_app: MakeApp) -> None:
    calls: list[str] = []

    def register(app: geste.App) -> None:
        @app.activity
        async def work(ctx: geste.ActivityContext) -> None:
            calls.append(ctx.instance_id)

        @app.workflow
        async def flow(ctx: geste.WorkflowContext) -> None:
            await work(ctx)

    client = make_app(run_worker=False)
    register(client)
    async with client:
        handle = await client.start_workflow("flow", instance_id="never-ran")
        info = await client.cancel("never-ran")
        assert info.status == geste.Status.CANCELLED
        assert info.cancel_requested and info.finished_at is not None
        with pytest.raises(WorkflowCancelled):
            await handle.result(timeout=1)

    worker = make_app()
    register(worker)
    async with worker:
        marker = await worker.start_workflow("flow", instance_id="after")
        await marker.result(timeout=10)  # the worker is claiming: the cancelled one stays put
        assert await worker.history("never-ran") == []
        assert await worker.get_handle("never-ran").status() == geste.Status.CANCELLED
    assert calls == ["after"]


async def test_cancelling_a_finished_instance_changes_nothing(make_app: MakeApp) -> None:
    app = make_app()

    @app.workflow
    async def flow(ctx: geste.WorkflowContext, fail: bool) -> str:
        if fail:
            raise InvoiceRejected("no")
        ctx.uuid4()
        return "done"

    async with app:
        done = await flow.start(False)
        failed = await flow.start(True)
        assert await done.result(timeout=10) == "done"
        with pytest.raises(WorkflowFailed):
            await failed.result(timeout=10)
        for handle in (done, failed):
            before = await handle.info()
            history = await handle.history()
            after_cancel = await handle.cancel()
            assert after_cancel == before
            assert await handle.info() == before
            assert await handle.history() == history
        assert await done.result(timeout=1) == "done"
        with pytest.raises(WorkflowFailed):
            await failed.result(timeout=1)


# -- history -------------------------------------------------------------------------------------------
async def test_history_records_every_step_in_order(make_app: MakeApp) -> None:
    app = make_app()

    @app.activity
    async def double(ctx: geste.ActivityContext, n: int) -> int:
        return 2 * n

    @app.workflow
    async def flow(ctx: geste.WorkflowContext, n: int) -> int:
        doubled = await double(ctx, n)
        ctx.random()
        await ctx.sleep(0)
        event = await ctx.wait_event("add", match={"to": "flow"})
        return doubled + event.data["n"]

    async with app:
        started = time.time()
        handle = await flow.start(4)
        await wait_status(app, handle.instance_id, geste.Status.WAITING)
        await app.send_event("add", {"to": "flow", "n": 1}, event_id="add-1")
        assert await handle.result(timeout=10) == 9
        history = await handle.history()
        info = await handle.info()

    assert [(e.seq, e.kind, e.name, e.is_error) for e in history] == [
        (1, geste.StepKind.ACTIVITY, "double", False),
        (2, geste.StepKind.RANDOM, "random", False),
        (3, geste.StepKind.SLEEP, "sleep", False),
        (4, geste.StepKind.WAIT_EVENT, "add", False),
        (5, geste.StepKind.EVENT, "add", False),
    ]
    activity = history[0].payload
    assert activity["result"] == 8 and activity["attempts"] == 1
    assert activity["input"] == {"args": [4], "kwargs": {}}
    assert activity["duration"] >= 0 and activity["started_at"] >= started - 1
    assert 0 <= history[1].payload < 1
    assert history[2].payload["seconds"] == 0
    assert history[3].payload["match"] == {"to": "flow"} and history[3].payload["timeout"] is None
    assert history[4].payload["event_id"] == "add-1" and history[4].payload["data"] == {"to": "flow", "n": 1}
    assert all(isinstance(e.created_at, datetime) and e.created_at.tzinfo is not None for e in history)
    assert [e.created_at for e in history] == sorted(e.created_at for e in history)
    assert info.steps == len(history)


# -- errors of the API ---------------------------------------------------------------------------------
async def test_an_unknown_instance_id_raises_instance_not_found(make_app: MakeApp) -> None:
    app = make_app()

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> None:
        return None

    async with app:
        handle = app.get_handle("missing")
        calls: list[Callable[[], Awaitable[Any]]] = [
            lambda: app.get_instance("missing"),
            lambda: app.history("missing"),
            lambda: app.cancel("missing"),
            lambda: app.send_event("x", instance_id="missing"),
            lambda: handle.result(timeout=1),
            handle.status,
            handle.history,
        ]
        for call in calls:
            with pytest.raises(InstanceNotFoundError) as raised:
                await call()
            assert raised.value.instance_id == "missing"


async def test_an_app_that_is_not_open_raises_app_not_open(make_app: MakeApp) -> None:
    app = make_app()

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> None:
        return None

    calls: list[Callable[[], Awaitable[Any]]] = [
        flow.start,
        lambda: app.start_workflow("flow"),
        lambda: app.get_instance("x"),
        lambda: app.list_instances(),
        lambda: app.history("x"),
        lambda: app.cancel("x"),
        lambda: app.send_event("x"),
        lambda: app.get_handle("x").result(timeout=1),
    ]
    for call in calls:
        with pytest.raises(AppNotOpenError):
            await call()

    async with app:
        handle = await flow.start()
        await handle.result(timeout=10)
    for call in calls:
        with pytest.raises(AppNotOpenError):
            await call()


@pytest.mark.parametrize(
    "options",
    [
        {"concurrency": 0},
        {"concurrency": 1.5},
        {"concurrency": True},
        {"lock_timeout": 0},
        {"lock_timeout": -1},
        {"poll_interval": 0},
        {"poll_interval": "1"},
        {"shutdown_grace": float("nan")},
        {"shutdown_grace": timedelta(seconds=-1)},
        {"max_payload_bytes": 0},
        {"default_retry": {"max_attempts": 3}},
        {"worker_id": "w" * 201},
    ],
)
def test_invalid_app_options_raise_configuration_error(db_url: str, options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        geste.App(db_url, **options)


@pytest.mark.parametrize(
    "url",
    ["mysql://localhost/db", "sqlite://", "sqlite:///x.db?colour=blue", "sqlite:///x.db?synchronous=maybe"],
)
def test_invalid_urls_raise_configuration_error(url: str) -> None:
    with pytest.raises(ConfigurationError):
        geste.App(url)


@pytest.mark.parametrize(
    "options",
    [
        {"max_attempts": 0},
        {"max_attempts": 2.0},
        {"max_attempts": True},
        {"initial_interval": -1},
        {"initial_interval": float("inf")},
        {"max_interval": "60"},
        {"backoff": 0.5},
        {"backoff": "2"},
        # regressions: a NaN, infinite or bool backoff, and a bare name or class as non_retryable
        # (a string was iterated letter by letter and silently matched nothing) were accepted
        {"backoff": float("nan")},
        {"backoff": float("inf")},
        {"backoff": True},
        {"timeout": 0},
        {"timeout": -5},
        {"non_retryable": [42]},
        {"non_retryable": [int]},
        {"non_retryable": "ValueError"},
        {"non_retryable": ValueError},
    ],
)
def test_invalid_retry_policies_raise_configuration_error(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        geste.RetryPolicy(**options)


def test_invalid_registrations_raise_configuration_error(db_url: str) -> None:
    app = geste.App(db_url)

    def not_async(ctx: geste.WorkflowContext) -> None:
        return None

    async def flow(ctx: geste.WorkflowContext) -> None:
        return None

    async def no_context() -> None:
        return None

    with pytest.raises(ConfigurationError):
        app.workflow(not_async)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        app.activity(no_context)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        app.activity(retry={"max_attempts": 1})  # type: ignore[call-overload]
    with pytest.raises(ConfigurationError):
        app.activity(timeout=0)
    app.workflow(flow)
    with pytest.raises(ConfigurationError):
        app.workflow(flow)
    with pytest.raises(ConfigurationError):
        app.workflow(name="")(flow)


async def test_a_result_awaited_while_the_app_closes_raises_app_not_open(make_app: MakeApp) -> None:
    """Regression: the waiting task used to end with a CancelledError, as if it had been cancelled."""
    app = make_app()

    @app.workflow
    async def flow(ctx: geste.WorkflowContext) -> None:
        await ctx.wait_event("never")

    async with app:
        handle = await flow.start()
        waiter = asyncio.create_task(handle.result())
        await wait_status(app, handle.instance_id, geste.Status.WAITING)

        async def parked_on_a_future() -> bool:
            return handle.instance_id in app.client._waiters

        await wait_until(parked_on_a_future)

    with pytest.raises(AppNotOpenError):
        await asyncio.wait_for(waiter, 5)
    assert not waiter.cancelled()
