"""The named queries of the two backends: one name for one job on both, every query used.

A job both backends do in one statement each has one name in both ``queries.sql``; the queries below are
those of one backend only, each with why the other has none (it does that job in more statements, or
in fewer, or does not need it). A query added to one backend only, or renamed in one, fails here until
it is named alike or listed.
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest

from geste._models import Status
from geste.storage._decisions import plan_page
from geste.storage._sql import load_queries
from geste.storage.base import InstanceFilter

SRC = Path(__file__).resolve().parents[1] / "src" / "geste" / "storage"

SQLITE_ONLY = {
    # several statements in one BEGIN IMMEDIATE where PostgreSQL has one statement
    "claim_pick": "one workflow's runnable heads (claim), merged in Python; PostgreSQL: claim, claim_names",
    "claim_picked": "takes the picked instances (claim); PostgreSQL: claim, claim_names",
    "next_run_after": "the next run_at after a short claim; PostgreSQL: the claim's last row",
    "lease_state": "why suspend updated nothing; PostgreSQL: suspend returns it",
    "clear_timers": "part of suspend, finish, a delivery; PostgreSQL: inside those statements",
    "clear_event_wait": "part of suspend, finish, a delivery; PostgreSQL: inside those statements",
    "insert_timer": "a suspension's timer; PostgreSQL: inside suspend",
    "retry_archive": "retry, 1/3; PostgreSQL: retry_instance",
    "retry_delete_row": "retry, 2/3; PostgreSQL: retry_instance",
    "retry_reopen": "retry, 3/3; PostgreSQL: retry_instance",
    "outbox_insert": "the outbox row of a step (record + this); PostgreSQL: outbox_record",
    "state_insert": "the value of a set_state step (record + this); PostgreSQL: state_set",
    "outbox_hold": "a claim round's holds, before outbox_claim; PostgreSQL: inside outbox_claim",
    "outbox_hold_next": "a failed attempt's hold; PostgreSQL: inside outbox_mark_failed",
    "outbox_has_later": "after a mark; PostgreSQL: returned by the marks",
    "channel_ensure_subscription": "receive, 1/3; PostgreSQL: channel_find",
    "channel_subscription": "receive, 2/3; PostgreSQL: channel_find",
    "channel_next_message": "receive, 3/3; PostgreSQL: channel_find",
    "channel_claim": "taking a message, 1/2; PostgreSQL: channel_take",
    "channel_advance": "taking a message, 2/2; PostgreSQL: channel_take",
    "channel_instance_exists": "publish, 1/3; PostgreSQL: channel_publish",
    "channel_insert_message": "publish, 2/3; PostgreSQL: channel_publish",
    "channel_wake_receivers": "publish, 3/3; PostgreSQL: channel_publish",
    "channel_cleanup_event_deliveries": "before channel_cleanup_events; PostgreSQL: inside it",
    "claim_ids_pick": "a claim by ids, 1/3 (then claim_picked); PostgreSQL: claim_ids",
    "stream_head": "a stream write batch, 1/3 per stream; PostgreSQL: stream_write",
    "stream_insert": "a stream write batch, 2/3 per item; PostgreSQL: stream_write",
    "stream_set_head": "a stream write batch, 3/3; PostgreSQL: stream_write",
    "claim_ids_later": "a claim by ids, 3/3: the named instances not due yet; PostgreSQL: claim_ids",
    "worker_peers": "the heartbeat's read of the other workers, after upsert_worker; PostgreSQL: heartbeat",
    "channel_delete_subscriptions": "after channel_cleanup_subscriptions; PostgreSQL: inside it",
    "channel_delete_messages": "after channel_cleanup_messages; PostgreSQL: inside it",
    "chore_state": "after chore_take took nothing; PostgreSQL: chore_take returns it",
    "queue_waiting": "a queue claim, 1/4: an empty line; PostgreSQL: queue_claim (geste_queue_claim)",
    "queue_limit": "a queue claim, 2/4: its global limit; PostgreSQL: queue_claim",
    "queue_busy": "a queue claim, 3/4: the slots in use; PostgreSQL: queue_claim",
    "queue_take": "a queue claim, 4/4: admit and claim; PostgreSQL: queue_claim",
    "queue_started": "a queue claim's rate window, after it admitted; PostgreSQL: queue_claim",
    "queue_partitions": "a partitioned queue claim: its partitions by head; PostgreSQL: queue_claim",
    "schedule_waiting_add": "a tick put to wait, 2/2 (after schedule_wait); PostgreSQL: schedule_wait",
    "schedule_unwait_tick": "a release, 1/2 (then schedule_unwait); PostgreSQL: schedule_unwait",
    "schedule_delete_waiting": "a delete's waiting ticks, before schedule_delete; PostgreSQL: inside it",
    "queue_partition_busy": "a partitioned queue claim: a partition's slots in use; PostgreSQL: queue_claim",
    "queue_partition_window": "a partitioned queue claim: a partition's rate window; PostgreSQL: queue_claim",
    "queue_partition_next": "a partitioned queue claim: a partition's next instance; PostgreSQL: queue_claim",
    "queue_partition_started": "a partition's rate window, after it admitted; PostgreSQL: queue_claim",
    "queue_take_ids": "a partitioned queue claim: admit and claim the picks; PostgreSQL: queue_claim",
    "channel_leftovers": "the re-wake's messages nobody took, before channel_rewake; PostgreSQL: inside it",
    "channel_cleanup_event_keys": "before channel_cleanup_events; PostgreSQL: inside it",
    "insert_event": "send_event, 1/5; PostgreSQL: send_event, one statement after lock_event_keys",
    "insert_event_keys": "send_event, 2/5; PostgreSQL: send_event",
    "waits_for_event": "send_event, 3/5 (the waits by key; matched in Python); PostgreSQL: send_event",
    "waits_for_event_target": "send_event, 3/5 (the target's wait); PostgreSQL: send_event",
    "deliver_event": "send_event, 4/5 (per instance handed the event); PostgreSQL: send_event",
    "wake": "send_event, 5/5 (per instance that takes it itself); PostgreSQL: send_event",
    "wake_parent": "a child's end (finish, cancel_unstarted) wakes its parent; PostgreSQL: inside those",
    "cancel_children": "a parent's end flags the children it cancels (finish); PostgreSQL: in finish",
    "continue_archive_run": "continue_as_new, 1/6 (after lease_state); PostgreSQL: continue_as_new",
    "continue_archive_history": "continue_as_new, 2/6 (after insert_history); PostgreSQL: continue_as_new",
    "continue_clear_history": "continue_as_new, 3/6; PostgreSQL: continue_as_new",
    "continue_reopen": "continue_as_new, 4/6 (then clear_timers, clear_event_wait); PostgreSQL: the same",
    "continue_stop_listening": "continue_as_new, 5/6; PostgreSQL: continue_as_new",
    "continue_outbox": "continue_as_new, 6/6; PostgreSQL: continue_as_new",
    "prune_instances_examine": "a retention batch, 1/14: the instances read; PostgreSQL: prune_instances",
    "prune_delete_instances": "a retention batch, 2/14; PostgreSQL: prune_instances",
    "prune_delete_history": "a retention batch, 3/14; PostgreSQL: prune_instances",
    "prune_delete_runs": "a retention batch, 4/14; PostgreSQL: prune_instances",
    "prune_delete_run_history": "a retention batch, 5/14; PostgreSQL: prune_instances",
    "prune_delete_timers": "a retention batch, 6/14; PostgreSQL: prune_instances",
    "prune_delete_event_waits": "a retention batch, 7/14; PostgreSQL: prune_instances",
    "prune_delete_event_deliveries": "a retention batch, 8/14; PostgreSQL: prune_instances",
    "prune_delete_channel_subscriptions": "a retention batch, 9/14; PostgreSQL: prune_instances",
    "prune_delete_outbox": "a retention batch, 10/14; PostgreSQL: prune_instances",
    "prune_delete_retries": "a retention batch, 11/14; PostgreSQL: prune_instances",
    "prune_delete_state": "a retention batch, 12/14; PostgreSQL: prune_instances",
    "prune_delete_streams": "a retention batch, 13/14; PostgreSQL: prune_instances",
    "prune_delete_stream_heads": "a retention batch, 14/14; PostgreSQL: prune_instances",
}
POSTGRES_ONLY = {
    "queue_claim": "the queue claim in one call of geste_queue_claim; SQLite: queue_waiting ... queue_take",
    "prune_instances": "a retention batch in one statement; SQLite: prune_instances_examine, 13 more",
    # one statement where SQLite has several, or what only PostgreSQL needs
    "claim": "pick and take for one workflow name, with the histories; SQLite: claim_pick, claim_picked",
    "claim_names": "the same for several names; SQLite: claim_pick, claim_picked",
    "record": "a step commit in one statement; SQLite: touch_lease, insert_history",
    "record_batch": "group commit of step commits (SQLite has no group commit)",
    "finish_batch": "group commit of ends (SQLite has no group commit)",
    "outbox_record": "record plus the outbox row; SQLite: touch_lease, insert_history, outbox_insert",
    "state_set": "record plus a state value; SQLite: touch_lease, insert_history, state_insert",
    "watch_state": "a wait_state registration (LISTEN/NOTIFY only; SQLite reads)",
    "retry_instance": "a retry's writes; SQLite: retry_archive, retry_delete_row, retry_reopen",
    "lock_instance": "an operator action's row lock; SQLite: get_instance inside BEGIN IMMEDIATE",
    "lock_event_keys": "advisory locks per match key; SQLite: BEGIN IMMEDIATE serialises writers",
    "send_event": "store and hand over an event in one statement; SQLite: insert_event and four more",
    "channel_lock": "an advisory lock per channel; SQLite: BEGIN IMMEDIATE serialises writers",
    "channel_find": "receive in one statement; SQLite: channel_ensure_subscription and two more",
    "channel_take": "taking a message in one statement; SQLite: channel_claim, channel_advance",
    "channel_publish": "publish in one statement; SQLite: channel_instance_exists and two more",
    "claim_ids": "a claim by ids with the histories; SQLite: claim_ids_pick, claim_picked, claim_ids_later",
    "heartbeat": "upsert_worker and the read of the other workers in one statement; SQLite: worker_peers",
    "route_wakeups": "a full worker hands its routed wake-ups on: NOTIFYs (SQLite has none)",
    "watch_result": "a result() call registers for the end's NOTIFY (SQLite has none: it reads)",
    "unwatch_results": "result() calls that stopped waiting forget their registrations (SQLite: none)",
    "result_waiters_cleanup": "the cleanup chore's expired result() registrations (SQLite: none)",
    "continue_as_new": "a run's end and the next's start in one statement; SQLite: lease_state, 9 more",
    "history_after": "a claim's catch-up past its snapshot (SQLite's claim reads in its write transaction)",
    "hand_on_queue": "a full worker hands a queue's backlog on: a NOTIFY (SQLite has none: it polls)",
    "stream_write": "a stream write batch in one statement; SQLite: stream_head and two more",
    "stream_watch": "a stream reader registers for the writes' NOTIFY (SQLite has none: it polls)",
    "stream_unwatch": "stream readers that stopped waiting forget their registrations (SQLite: none)",
    "stream_readers_cleanup": "the cleanup chore's expired stream reader registrations (SQLite: none)",
    "stream_notify": "the batched notification of the streams written (SQLite has no NOTIFY)",
    "transaction_isolation": "a caller's transaction must be read committed (SQLite offers no writes in one)",
}


def test_a_job_of_both_backends_has_one_name_in_both() -> None:
    sqlite, postgres = set(load_queries("sqlite")), set(load_queries("postgres"))
    assert sqlite - postgres == set(SQLITE_ONLY), "a SQLite query named unlike PostgreSQL's, or not listed"
    assert postgres - sqlite == set(POSTGRES_ONLY), "a PostgreSQL query named unlike SQLite's, or not listed"
    assert len(sqlite & postgres) > 50


def _names_in(module: str) -> set[str]:
    """Every string constant of a backend module (the query names it subscripts its table with, directly
    or through a variable), with the page queries ``plan_page`` names for it."""
    tree = ast.parse((SRC / module).read_text(encoding="utf-8"))
    found = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    filters = [
        InstanceFilter(workflow_name=w, status=s)
        for w, s in itertools.product((None, "x"), (None, Status.FAILED))
    ]
    for which, key in itertools.product(filters, (None, (1.0, "id"))):
        found.add(plan_page(which, None, key).query)
        found.add(plan_page(which, key, None).query)
    return found


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_every_query_is_used_by_its_backend(backend: str) -> None:
    unused = set(load_queries(backend)) - _names_in(f"{backend}.py")
    assert not unused, f"queries of {backend} that storage/{backend}.py never names: {sorted(unused)}"
