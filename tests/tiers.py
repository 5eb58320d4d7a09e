"""The tiers of the test suite, by module: ``pytest -m unit`` runs one tier (``make test`` runs them all).

- ``unit``: one part in isolation, no worker running (the history format, the named queries, the layers,
  the schema files, the testing harness): seconds.
- ``integration``: behaviour on both backends (a SQLite file and the real PostgreSQL), in process or with
  worker processes killed, restarted and raced; the storage contract (``test_storage_contract``) is here.
  Every module not named below.
- ``acceptance``: what a user touches, end to end: the command line, HTTP, the viewer (in a real browser
  too), the README's and the guides' examples, the documentation site, the FastAPI example, the
  CloudEvents SDK, the benchmarks' own parts.
- ``fuzz``: generated input (hypothesis): bad input over HTTP and the API, replay properties.
- ``golden``: recorded histories replayed (``tests/golden``): the history format byte for byte, the replay
  check, patches over old and new histories.
The chaos suite (``python -m tests.chaos``, ``make chaos``) is a tier of its own, outside pytest.
"""

from __future__ import annotations

TIERS: dict[str, frozenset[str]] = {
    "unit": frozenset(
        {"test_engine_layers", "test_storage_queries", "test_storage_schema", "test_client", "test_testing"}
    ),
    "acceptance": frozenset(
        {
            "test_cli",
            "test_cli_operations",
            "test_cli_schedules",
            "test_http",
            "test_http_schedules",
            "test_http_serve",
            "test_viewer",
            "test_viewer_browser",
            "test_viewer_schedules",
            "test_readme",
            "test_docs_examples",
            "test_docs_site",
            "test_fastapi",
            "test_cloudevents_sdk",
            "test_benchmarks",
            "test_scale",
        }
    ),
    "fuzz": frozenset({"test_fuzz_http", "test_fuzz_input", "test_replay_properties"}),
    "golden": frozenset({"test_steps", "test_replay_check", "test_patches"}),
}
DEFAULT = "integration"
NAMES = (*TIERS, DEFAULT)


def tier_of(module: str) -> str:
    """The tier of a test module (its name without ``.py``)."""
    for tier, modules in TIERS.items():
        if module in modules:
            return tier
    return DEFAULT
