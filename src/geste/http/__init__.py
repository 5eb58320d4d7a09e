"""geste over HTTP: an ASGI application (``app.asgi()``) that takes CloudEvents and serves the instance API.

``geste serve`` runs it under uvicorn (``pip install 'geste[http]'``); any ASGI server will do.
"""

from __future__ import annotations

from ._endpoints import GesteASGI

__all__ = ["GesteASGI"]
