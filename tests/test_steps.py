"""The history format (``geste._steps``): one typed step per kind, written byte for byte as geste has
always written it, read back checked; a row geste cannot read raises ``HistoryCorruptedError`` naming its
step. The golden payloads below are what the writers of the engine and of the storage wrote before the
format had types (and what databases and exported histories hold)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import pytest

import geste
from geste import _steps
from geste._steps import (
    ActivityStep,
    CancelledStep,
    ChildStep,
    CompensationStep,
    ContinueAsNewStep,
    EventStep,
    EventTimeoutStep,
    MessageStep,
    NowStep,
    PatchStep,
    PublishStep,
    RandomStep,
    RawJSON,
    ReceiveStep,
    ReceiveTimeoutStep,
    SendEventStep,
    SendToStep,
    SetStateStep,
    SleepStep,
    StartChildStep,
    Step,
    SubscribeStep,
    UuidStep,
    WaitEventStep,
    decode_step,
    event_history_payload,
    message_history_payload,
)
from geste.errors import HistoryCorruptedError
from geste.storage.base import HistoryRow, StoredEvent, StoredMessage

from .support import wait_status

ARGS = {"args": ["cup", 2], "kwargs": {"note": "é"}}
ARGS_TEXT = '{"args":["cup",2],"kwargs":{"note":"\\u00e9"}}'
ERROR = {"type": "builtins.RuntimeError", "message": "boom", "args": ["boom"], "traceback": "Traceback...\n"}
A_UUID = "6f1c7c56-8f6e-4a53-9c1e-5a1f3f0b2a11"

# (kind, is_error, the step, its payload as geste writes it)
GOLDEN: list[tuple[str, bool, Step, str | None]] = [
    (
        "activity",
        False,
        ActivityStep({"id": "r-1", "n": 1.5}, None, 1, 1893456000.25, 0.5, ARGS),
        '{"result":{"id":"r-1","n":1.5},"attempts":1,"started_at":1893456000.25,"duration":0.5,'
        '"input":{"args":["cup",2],"kwargs":{"note":"\\u00e9"}}}',
    ),
    (
        "activity",
        True,
        ActivityStep(None, ERROR, 3, 1893456000.0, 2.5, ARGS),
        '{"error":{"type":"builtins.RuntimeError","message":"boom","args":["boom"],'
        '"traceback":"Traceback...\\n"},"attempts":3,"started_at":1893456000.0,"duration":2.5,'
        '"input":{"args":["cup",2],"kwargs":{"note":"\\u00e9"}}}',
    ),
    (
        "compensation",
        False,
        CompensationStep(None, None, 1, 1893456000.25, 0.5, {"args": [], "kwargs": {}}),
        '{"result":null,"attempts":1,"started_at":1893456000.25,"duration":0.5,"input":{"args":[],"kwargs":{}}}',
    ),
    ("sleep", False, SleepStep(60.0, 1893456060.5), '{"seconds":60.0,"expires_at":1893456060.5}'),
    (
        "wait_event",
        False,
        WaitEventStep({"item": "cup"}, 172800.0, 1893628800.0),
        '{"match":{"item":"cup"},"timeout":172800.0,"deadline":1893628800.0}',
    ),
    ("wait_event", False, WaitEventStep(None, None, None), '{"match":null,"timeout":null,"deadline":null}'),
    (
        "event",
        False,
        EventStep("e-1", "shipped", "/shop", 1893456100.125, {"traceparent": "00-ab"}, {"item": "cup"}),
        '{"event_id":"e-1","type":"shipped","source":"/shop","time":1893456100.125,'
        '"extensions":{"traceparent":"00-ab"},"data":{"item":"cup"}}',
    ),
    (
        "event",
        False,
        EventStep("e-2", "shipped", None, 1893456100.0, None, None),
        '{"event_id":"e-2","type":"shipped","source":null,"time":1893456100.0,"extensions":null,"data":null}',
    ),
    ("event_timeout", True, EventTimeoutStep(), None),
    ("subscribe", False, SubscribeStep("broadcast"), '{"mode":"broadcast"}'),
    ("subscribe", False, SubscribeStep("competing"), '{"mode":"competing"}'),
    ("subscribe", False, SubscribeStep("broadcast", implicit=True), '{"mode":"broadcast","implicit":true}'),
    ("receive", False, ReceiveStep(5.0, 1893456005.0), '{"timeout":5.0,"deadline":1893456005.0}'),
    ("receive", False, ReceiveStep(None, None), '{"timeout":null,"deadline":null}'),
    (
        "message",
        False,
        MessageStep("m-1", "box", "sender-1", 1893456200.5, False, [1, "two"]),
        '{"message_id":"m-1","channel":"box","sender_instance_id":"sender-1","published_at":1893456200.5,'
        '"direct":false,"data":[1,"two"]}',
    ),
    (
        "message",
        False,
        MessageStep("m-2", "box", None, 1893456201.0, True, {"for": "me"}),
        '{"message_id":"m-2","channel":"box","sender_instance_id":null,"published_at":1893456201.0,'
        '"direct":true,"data":{"for":"me"}}',
    ),
    ("receive_timeout", True, ReceiveTimeoutStep(), None),
    ("publish", False, PublishStep("abc123", None), '{"message_id":"abc123","target_instance_id":null}'),
    ("send_to", False, SendToStep("abc124", "peer"), '{"message_id":"abc124","target_instance_id":"peer"}'),
    ("send_to", True, SendToStep(None, "ghost"), '{"message_id":null,"target_instance_id":"ghost"}'),
    ("now", False, NowStep(1893456000.123456), "1893456000.123456"),
    ("uuid", False, UuidStep(uuid.UUID(A_UUID)), f'"{A_UUID}"'),
    ("random", False, RandomStep(0.5488135039273248), "0.5488135039273248"),
    ("cancelled", False, CancelledStep(), None),
    (
        "send_event",
        False,
        SendEventStep("i-1:9", "order.paid", "/geste/order", None),
        '{"event_id":"i-1:9","type":"order.paid","source":"/geste/order","subject":null}',
    ),
    (
        "send_event",
        False,
        SendEventStep("mine", "a.b", "https://shop.example", "o-1"),
        '{"event_id":"mine","type":"a.b","source":"https://shop.example","subject":"o-1"}',
    ),
    ("continue_as_new", False, ContinueAsNewStep(ARGS), '{"input":' + ARGS_TEXT + "}"),
    ("start_child", False, StartChildStep("p:1", "cancel"), '{"child_id":"p:1","parent_close":"cancel"}'),
    ("cancelled", False, CancelledStep("p"), '{"by_parent":"p"}'),
    (
        "start_child",
        True,
        StartChildStep("x", "wait", "taken"),
        '{"child_id":"x","parent_close":"wait","error":"taken"}',
    ),
    (
        "child",
        False,
        ChildStep("kid", "completed", {"a": 1}, None),
        '{"workflow":"kid","status":"completed","error":null,"result":{"a":1}}',
    ),
    (
        "child",
        True,
        ChildStep("kid", "failed", None, {"type": "E", "message": "m"}),
        '{"workflow":"kid","status":"failed","error":{"type":"E","message":"m"},"result":null}',
    ),
    ("set_state", False, SetStateStep(12), '{"size":12}'),
    ("patch", False, PatchStep(), None),
]
GOLDEN_IDS = [f"{kind}-{n}" for n, (kind, *_) in enumerate(GOLDEN)]


def test_every_kind_has_its_step_and_a_golden_payload() -> None:
    assert set(_steps.STEPS) == {kind.value for kind in geste.StepKind}
    assert {kind for kind, *_ in GOLDEN} == set(_steps.STEPS)
    for kind, cls in _steps.STEPS.items():
        assert cls.kind == kind


@pytest.mark.parametrize(("kind", "is_error", "step", "payload"), GOLDEN, ids=GOLDEN_IDS)
def test_golden_payloads_are_written_byte_for_byte_and_read_back(
    kind: str, is_error: bool, step: Step, payload: str | None
) -> None:
    assert step.encode() == payload
    assert type(step).decode(payload, is_error=is_error) == step
    row = HistoryRow(4, kind, "name", payload, is_error, 1893456000.0)
    decoded = decode_step(row, instance_id="i-1")
    assert type(decoded) is type(step) and decoded == step
    assert decoded.encode() == payload  # a round trip changes no byte
    assert getattr(step, "is_error", is_error) == is_error


def test_the_fast_paths_inline_encoded_json() -> None:
    """An activity's arguments and an event's or a message's data, already JSON text, are inlined."""
    written = ActivityStep({"id": "r-1", "n": 1.5}, None, 1, 1893456000.25, 0.5, RawJSON(ARGS_TEXT))
    assert written.encode() == GOLDEN[0][3]
    event = EventStep(
        "e-1", "shipped", "/shop", 1893456100.125, {"traceparent": "00-ab"}, RawJSON('{"item":"cup"}')
    )
    assert event.encode() == GOLDEN[6][3]
    stored = StoredEvent(
        7, "e-1", "shipped", '{"item":"cup"}', "/shop", '{"traceparent":"00-ab"}', 1893456100.125
    )
    assert event_history_payload(stored) == GOLDEN[6][3]
    message = MessageStep("m-1", "box", "sender-1", 1893456200.5, False, RawJSON('[1,"two"]'))
    assert message.encode() == GOLDEN[14][3]
    direct = StoredMessage(4, "m-2", "box", '{"for":"me"}', None, "me", 1893456201.0)
    assert message_history_payload(direct) == GOLDEN[15][3]
    assert ContinueAsNewStep(RawJSON(ARGS_TEXT)).encode() == GOLDEN[-8][3]
    assert ChildStep("kid", "completed", RawJSON('{"a":1}'), None).encode() == GOLDEN[-4][3]
    assert (
        _steps.activity_payload(
            {"id": "r-1", "n": 1.5}, None, 1, 1893456000.25, 0.5, ARGS_TEXT, what="result", limit=None
        )
        == GOLDEN[0][3]
    )  # the engine's writer: the step not built


def test_the_limit_and_the_errors_of_user_values() -> None:
    step = ActivityStep("x" * 100, None, 1, 0.0, 0.0, RawJSON("{}"))
    with pytest.raises(geste.errors.PayloadTooLargeError, match="result of activity a"):
        step.encode(what="result of activity a", limit=50)
    with pytest.raises(geste.errors.SerializationError, match="result of activity a cannot be stored"):
        ActivityStep(object(), None, 1, 0.0, 0.0, RawJSON("{}")).encode(what="result of activity a")
    with pytest.raises(geste.errors.PayloadTooLargeError, match="event match"):
        WaitEventStep({"k": "v" * 100}, None, None).encode(limit=50)


def test_values_as_the_workflow_gets_them() -> None:
    event = decode_step(HistoryRow(3, "event", "shipped", GOLDEN[6][3], False, 0.0), instance_id="i")
    assert isinstance(event, EventStep)
    assert event.event() == geste.Event(
        "e-1",
        "shipped",
        {"item": "cup"},
        "/shop",
        datetime.fromtimestamp(1893456100.125, UTC),
        {"traceparent": "00-ab"},
    )
    assert EventStep("e", "t", None, None, None, None).event().extensions == {}
    message = decode_step(HistoryRow(5, "message", "box", GOLDEN[14][3], False, 0.0), instance_id="i")
    assert isinstance(message, MessageStep)
    assert message.message() == geste.Message(
        "m-1", "box", [1, "two"], "sender-1", datetime.fromtimestamp(1893456200.5, UTC), False
    )
    activity = decode_step(HistoryRow(1, "compensation", "a", GOLDEN[0][3], False, 0.0), instance_id="i")
    assert activity == CompensationStep({"id": "r-1", "n": 1.5}, None, 1, 1893456000.25, 0.5, ARGS)
    now = NowStep.decode("1893456000.5")
    assert now.moment() == datetime.fromtimestamp(1893456000.5, UTC)
    assert UuidStep.decode(f'"{A_UUID}"').value == uuid.UUID(A_UUID)


# (kind, is_error, payload, what the problem says)
TIMING = '"attempts":1,"started_at":0,"duration":0,"input":{}'
CORRUPTED: list[tuple[str, bool, str | None, str]] = [
    ("activity", False, '{"result": 1, "attempts": 1', "JSONDecodeError"),
    ("activity", False, '["r"]', "is not an object"),
    ("activity", False, None, "is not an object"),
    (
        "activity",
        True,
        '{"result":1,"attempts":1,"started_at":0,"duration":0,"input":{}}',
        "KeyError: 'error'",
    ),
    (
        "activity",
        True,
        '{"error":"boom","attempts":1,"started_at":0,"duration":0,"input":{}}',
        "not an object",
    ),
    (
        "activity",
        False,
        '{"result":1,"attempts":"1","started_at":0,"duration":0,"input":{}}',
        "not an integer",
    ),
    ("activity", False, '{"result":1,"attempts":1,"started_at":"t","duration":0,"input":{}}', "not a number"),
    ("activity", False, '{"result":1,"attempts":1,"started_at":0,"duration":0}', "KeyError: 'input'"),
    ("compensation", False, '{"attempts":1,"started_at":0,"duration":0,"input":{}}', "KeyError: 'result'"),
    ("sleep", False, '{"seconds": 1}', "KeyError: 'expires_at'"),
    ("sleep", False, '{"seconds": 1, "expires_at": true}', "True is not a number"),
    ("wait_event", False, '{"match": null, "timeout": null, "deadline": "soon"}', "'soon' is not a number"),
    ("wait_event", False, '{"match": [1], "timeout": null, "deadline": null}', "match [1] is not an object"),
    ("wait_event", False, '{"timeout": null, "deadline": null}', "KeyError: 'match'"),
    ("event", False, '{"data": {"who": "victim"}}', "KeyError: 'event_id'"),
    ("event", False, '{"event_id": 7, "type": "t"}', "7 is not a string"),
    ("event", False, '{"event_id": "e", "type": "t", "time": 1e300}', "OverflowError"),
    ("event", False, '{"event_id": "e", "type": "t", "extensions": [1]}', "extensions [1] is not an object"),
    ("event_timeout", True, '{"x": 1}', "should be null"),
    ("subscribe", False, '{"mode": "telepathy"}', "'telepathy' is not a subscription mode"),
    ("subscribe", False, '{"mode": "broadcast", "implicit": 1}', "implicit 1 is not a boolean"),
    ("receive", False, '{"timeout": null}', "KeyError: 'deadline'"),
    ("message", False, "not json at all", "JSONDecodeError"),
    ("message", False, '{"message_id": "m", "channel": "c"}', "KeyError: 'published_at'"),
    ("message", False, '{"message_id": "m", "channel": "c", "published_at": "noon"}', "not a number"),
    ("receive_timeout", True, '"late"', "should be null"),
    ("publish", False, '{"message_id": null, "target_instance_id": null}', "None is not a string"),
    ("send_to", True, '{"message_id": null}', "KeyError: 'target_instance_id'"),
    ("now", False, '"yesterday"', "'yesterday' is not a number"),
    ("now", False, "1e300", "OverflowError"),
    ("uuid", False, '"not-a-uuid"', "ValueError"),
    ("uuid", False, "42", "42 is not a string"),
    ("random", False, '"0.5"', "is not a number"),
    ("cancelled", False, "{}", "KeyError: 'by_parent'"),
    ("send_event", False, '{"type": "t", "source": "s", "subject": null}', "KeyError: 'event_id'"),
    ("send_event", False, '{"event_id": "e", "type": "t", "source": null, "subject": null}', "not a string"),
    ("continue_as_new", False, '{"args": [], "kwargs": {}}', "KeyError: 'input'"),
    ("continue_as_new", False, '{"input": {"args": {}}}', "is not {'args'"),
    ("activity", False, "[" * 100_000 + "]" * 100_000, "RecursionError"),
]


@pytest.mark.parametrize(
    ("kind", "is_error", "payload", "problem"),
    CORRUPTED,
    ids=[f"{c[0]}-{n}" for n, c in enumerate(CORRUPTED)],
)
def test_a_corrupted_row_raises_history_corrupted_error(
    kind: str, is_error: bool, payload: str | None, problem: str
) -> None:
    row = HistoryRow(7, kind, "its-name", payload, is_error, 0.0)
    with pytest.raises(HistoryCorruptedError) as raised:
        decode_step(row, instance_id="victim")
    error = raised.value
    assert error.instance_id == "victim" and error.seq == 7
    assert error.problem.startswith(f"{kind} 'its-name' row unreadable (") and problem in error.problem
    assert "'victim'" in str(error) and "step 7" in str(error)
    try:
        body = None if payload is None else json.loads(payload)
    except (ValueError, RecursionError):
        return
    assert _steps.step_or_none(kind, body, is_error=is_error) is None  # a display shows it as it is


def test_an_unknown_kind_is_corruption() -> None:
    with pytest.raises(HistoryCorruptedError, match="corrupted at step 2: unknown step kind 'teleport'"):
        decode_step(HistoryRow(2, "teleport", "x", "{}", False, 0.0), instance_id="i")
    with pytest.raises(HistoryCorruptedError, match="unknown step kind 'teleport'"):
        _steps.read_row(HistoryRow(2, "teleport", "x", "{}", False, 0.0), instance_id="i")
    with pytest.raises(
        HistoryCorruptedError, match="step 3: sleep 'sleep' row unreadable \\(JSONDecodeError"
    ):
        _steps.read_row(HistoryRow(3, "sleep", "sleep", "{", False, 0.0), instance_id="i")
    assert _steps.read_row(HistoryRow(3, "sleep", "sleep", '{"a":1}', False, 0.0), instance_id="i") == (
        geste.StepKind.SLEEP,
        {"a": 1},
    )
    assert _steps.step_or_none("teleport", {}, is_error=False) is None


# -- what a database holds: rows written by the engine and by the storage (in SQL or in Python) ------------
async def test_rows_written_live_decode_and_encode_to_the_same_bytes(
    make_app: Callable[..., geste.App], db_url: str
) -> None:
    """A workflow takes a step of every kind; each row it recorded decodes, and encodes back to the very
    bytes the database holds. The event delivered to the waiting instance is the row that the storage
    writes itself (PostgreSQL builds it in SQL, ``send_event``): it is what ``EventStep`` writes."""
    app = make_app()

    @app.activity
    async def double(ctx: geste.ActivityContext, n: int) -> int:
        return 2 * n

    @app.activity(retry=geste.RetryPolicy(max_attempts=1))
    async def explode(ctx: geste.ActivityContext) -> None:
        raise RuntimeError("boom")

    @app.activity
    async def undo(ctx: geste.ActivityContext, what: str) -> None:
        return None

    @app.workflow
    async def every_kind(ctx: geste.WorkflowContext) -> None:
        go = await ctx.wait_event("go")  # delivered into the waiting instance's history by the storage
        early = await ctx.wait_event("early", match={"k": 1}, timeout=3600)  # sent before: taken
        with pytest.raises(geste.errors.EventTimeout):
            await ctx.wait_event("never", timeout=0)
        await double(ctx, go.data["n"] + early.data["k"])
        ctx.now()
        ctx.uuid4()
        ctx.random()
        await ctx.sleep(0)
        await ctx.subscribe("news", mode="competing")
        await ctx.publish("news", {"headline": "é"})
        await ctx.send_to(ctx.instance_id, "box", [1, "two"])
        assert (await ctx.receive("box", timeout=60)).direct  # an implicit subscription, a receive, a message
        with pytest.raises(geste.errors.ReceiveTimeout):
            await ctx.receive("box", timeout=0)
        with pytest.raises(geste.errors.InstanceNotFoundError):
            await ctx.send_to("ghost", "box", None)
        await ctx.send_event("order.paid", {"total": 9.5}, subject="o-1")
        await ctx.set_state("progress", {"done": "é"})
        assert ctx.patched("v2")  # a new run: a patch marker
        assert await ctx.run_child(twice, 2) == 2  # a start_child row, then a child row
        ctx.on_failure(undo, "everything")
        await explode(ctx)

    @app.workflow
    async def cancelled(ctx: geste.WorkflowContext) -> None:
        await ctx.sleep(3600)

    @app.workflow
    async def twice(ctx: geste.WorkflowContext, n: int) -> int:
        if n < 2:
            await ctx.continue_as_new(n + 1)  # its row is in the kept run's history
        return n

    async with app:
        again = await twice.start(1)
        assert await again.result(timeout=30) == 2
        handle = await every_kind.start()
        stopped = await cancelled.start()
        await wait_status(app, handle.instance_id, geste.Status.WAITING)
        await app.send_event("early", {"k": 1}, instance_id=handle.instance_id, source="/test")
        await app.send_event("go", {"n": 20}, event_id="go-1", extensions={"trace": "t-1"})
        with pytest.raises(geste.errors.WorkflowFailed):
            await handle.result(timeout=30)
        await wait_status(app, stopped.instance_id, geste.Status.WAITING)
        await app.cancel(stopped.instance_id)
        with pytest.raises(geste.errors.WorkflowCancelled):
            await stopped.result(timeout=30)
        rows = [
            *await app.storage.get_history(handle.instance_id),
            *await app.storage.get_history(stopped.instance_id),
            *await app.storage.get_run_history(again.instance_id, 1),
        ]

    kinds = [row.kind for row in rows]
    assert set(kinds) == set(_steps.STEPS), set(_steps.STEPS) - set(kinds)
    for row in rows:
        step = decode_step(row, instance_id="i")
        assert step.kind == row.kind
        assert step.encode() == row.payload, row
        assert getattr(step, "is_error", row.is_error) == row.is_error
    delivered = next(row for row in rows if row.kind == "event" and row.name == "go")
    written = EventStep("go-1", "go", None, delivered.created_at, {"trace": "t-1"}, RawJSON('{"n":20}'))
    assert delivered.payload == written.encode() and not delivered.is_error
    assert decode_step(delivered, instance_id="i") == EventStep(
        "go-1", "go", None, delivered.created_at, {"trace": "t-1"}, {"n": 20}
    )
    taken = next(row for row in rows if row.kind == "event" and row.name == "early")
    early = decode_step(taken, instance_id="i")
    assert isinstance(early, EventStep) and early.source == "/test" and early.data == {"k": 1}
    message = next(row for row in rows if row.kind == "message")
    received = decode_step(message, instance_id="i")
    assert received == MessageStep(
        received.message_id, "box", handle.instance_id, received.published_at, True, [1, "two"]
    )
    assert (
        message.payload
        == MessageStep(
            received.message_id, "box", handle.instance_id, received.published_at, True, RawJSON('[1,"two"]')
        ).encode()
    )
