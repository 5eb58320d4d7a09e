"""The engine: one run of one instance, its workflow's steps recorded and replayed.

- ``context``: what user code receives (``WorkflowContext``, ``ActivityContext``);
- ``run``: ``Engine``, one run of a claimed instance from its history to a suspension or its end;
- ``replay``: the replay check (recorded histories against the current code, nothing written).

The engine imports the runtime, the storage and the core modules, never what is above it (the App, the
client, the interfaces): what it needs of them it is given (``Engine``'s constructor).
"""
