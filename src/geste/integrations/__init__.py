"""Integrations of geste with other libraries, each an optional extra imported on its own:

- ``geste.integrations.pydantic_ai``: durable pydantic-ai agents (``pip install 'geste[pydantic-ai]'``).

``import geste`` imports none of them.
"""
