"""A long outage of a real HTTP destination: a server answering 503 for longer than the relay's whole
back-off schedule, on a clock that only the test moves (hours pass in no time, nothing is slept).

With the defaults (``outbox_max_attempts=None``) nothing is ever given up: once the destination is back,
every event goes out, in order per instance. With ``outbox_max_attempts`` the events that ran out of
attempts are ``dead``: visible (status, attempts, last error), holding the later events of their instance
back, and re-queued by an operator, after which everything goes out in order too.
"""

from __future__ import annotations

from collections.abc import Callable

import geste

from .support import wait_status
from .test_outbox import Delivery, Receiver, VirtualClock, check_order, register_waiting, run_until

MakeApp = Callable[..., geste.App]

SCHEDULE_TO_CAP = sum(min(300.0, 1.0 * 2**k) for k in range(9))
"""The default back-off (1 s doubling, capped at 300 s) until it reaches its cap: 511 s."""


def by_instance(receiver: Receiver) -> dict[str, list[int]]:
    """The events each instance got through (a 2xx answer), by their ``data["i"]``, in arrival order."""
    got: dict[str, list[int]] = {}
    for d in receiver.answered():
        got.setdefault(d.event["gesteinstanceid"], []).append(d.event["data"]["i"])
    return got


async def test_a_503_outage_longer_than_the_back_off_schedule_loses_nothing(make_app: MakeApp) -> None:
    clock = VirtualClock()
    start = clock.now
    down = True

    def respond(d: Delivery) -> int:
        return 503 if down else 200

    async with Receiver(respond) as receiver:
        app = make_app(outbox_endpoint=receiver.url, clock=clock)  # the defaults: 1 s to 300 s, no limit
        assert app.outbox_config.max_attempts is None
        emit = register_waiting(app)
        async with app:
            handles = [await emit.start_with_id(f"o-{n}", 3, True) for n in range(4)]
            for handle in handles:
                await wait_status(app, handle.instance_id, geste.Status.WAITING)
            outage = 3 * 3600.0  # twenty times the ramp to the cap, then about 34 capped attempts
            assert outage > 20 * SCHEDULE_TO_CAP
            await run_until(app, clock, start + outage / 2)
            await app.send_event("more")  # every instance emits three more events mid-outage
            for handle in handles:
                await handle.result(timeout=10)
            await run_until(app, clock, start + outage)

            entries = await app.outbox(limit=10_000)
            assert len(entries) == 4 * 6
            assert {e.status for e in entries} == {geste.OutboxStatus.PENDING}  # none dead, none dropped
            first_seq = {
                h.instance_id: min(e.seq for e in entries if e.instance_id == h.instance_id) for h in handles
            }
            firsts = [e for e in entries if e.seq == first_seq[e.instance_id]]
            assert len(firsts) == 4
            for entry in firsts:
                assert entry.attempts >= 40, entry  # ~9 to reach the cap, then one every 300 s
                assert entry.last_error is not None and entry.last_error.startswith("HTTP 503")
            assert receiver.answered() == [] and {d.event["data"]["i"] for d in receiver.deliveries} == {0}

            down = False  # back: everything goes out, in order, within one capped back-off
            await run_until(app, clock, start + outage + 2 * 300)
            entries = await app.outbox(limit=10_000)
            assert {e.status for e in entries} == {geste.OutboxStatus.DELIVERED}
    assert len(receiver.answered(5)) >= 4 * 40
    check_order(receiver.deliveries)
    assert by_instance(receiver) == {h.instance_id: list(range(6)) for h in handles}


async def test_with_max_attempts_the_outage_dead_letters_visibly_and_a_retry_delivers_in_order(
    make_app: MakeApp,
) -> None:
    clock = VirtualClock()
    start = clock.now
    down = True

    def respond(d: Delivery) -> int:
        return 503 if down else 200

    async with Receiver(respond) as receiver:
        app = make_app(outbox_endpoint=receiver.url, clock=clock, outbox_max_attempts=8)
        emit = register_waiting(app)
        async with app:
            handles = [await emit.start_with_id(f"d-{n}", 3, False) for n in range(3)]
            for handle in handles:
                await handle.result(timeout=10)
            await run_until(app, clock, start + 3600)  # 8 attempts take 1+2+...+64 = 127 s: all spent

            dead = await app.outbox(status=geste.OutboxStatus.DEAD, limit=10_000)
            assert sorted(e.instance_id for e in dead) == [h.instance_id for h in handles]  # one each
            for entry in dead:
                assert entry.attempts == 8 and entry.next_attempt_at is None
                assert entry.last_error is not None and entry.last_error.startswith("HTTP 503")
            held = await app.outbox(status=geste.OutboxStatus.PENDING, limit=10_000)
            assert len(held) == 3 * 2 and all(e.attempts == 0 for e in held)  # never sent, kept
            assert len(receiver.deliveries) == 3 * 8

            down = False
            for entry in dead:
                assert await app.retry_outbox_event(entry.event_id) is True
            await run_until(app, clock, start + 2 * 3600)
            entries = await app.outbox(limit=10_000)
            assert {e.status for e in entries} == {geste.OutboxStatus.DELIVERED}
    check_order(receiver.deliveries)
    assert by_instance(receiver) == {h.instance_id: [0, 1, 2] for h in handles}
