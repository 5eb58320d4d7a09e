"""geste: durable workflows for asyncio Python, recorded step by step in SQLite or PostgreSQL.

Only the names below are public; everything in ``geste._*`` may change without notice.
"""

from __future__ import annotations

from . import errors
from ._app import App
from ._channels import Message
from ._definitions import Activity, Workflow
from ._handle import WorkflowHandle
from ._metrics import MetricFamily, Metrics, MetricSample, MetricsSnapshot
from ._metrics_http import MetricsServer
from ._models import (
    Event,
    HistoryEntry,
    InstanceInfo,
    ParentClose,
    RunInfo,
    StateValue,
    Status,
    StepKind,
    StreamEntry,
)
from ._operations import ResumeResult, RetryRecord
from ._queues import Queue, QueueInfo
from ._retry import RetryPolicy
from ._schedules import ScheduleInfo
from ._status import (
    LeaseInfo,
    ListenerState,
    ListenerStatus,
    PruneResult,
    QueueStats,
    SystemStatus,
    WorkerInfo,
)
from .engine.context import ActivityContext, ChildHandle, WorkflowContext
from .runtime.relay import OutboxEntry, OutboxEvent, OutboxStatus

__version__ = "0.1.0"

__all__ = [
    "Activity",
    "ActivityContext",
    "App",
    "ChildHandle",
    "Event",
    "HistoryEntry",
    "InstanceInfo",
    "LeaseInfo",
    "ListenerState",
    "ListenerStatus",
    "Message",
    "MetricFamily",
    "MetricSample",
    "Metrics",
    "MetricsServer",
    "MetricsSnapshot",
    "OutboxEntry",
    "OutboxEvent",
    "OutboxStatus",
    "ParentClose",
    "PruneResult",
    "Queue",
    "QueueInfo",
    "QueueStats",
    "ResumeResult",
    "RetryPolicy",
    "RetryRecord",
    "RunInfo",
    "ScheduleInfo",
    "StateValue",
    "Status",
    "StepKind",
    "StreamEntry",
    "SystemStatus",
    "WorkerInfo",
    "Workflow",
    "WorkflowContext",
    "WorkflowHandle",
    "__version__",
    "errors",
]
