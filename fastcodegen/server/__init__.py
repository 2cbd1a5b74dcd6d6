"""`fastcodegen serve`: an OpenAI- and Copilot-compatible HTTP server over an Engine.

Needs the `server` extra (`pip install "fastcodegen[server]"`: FastAPI,
uvicorn, prometheus_client); `import fastcodegen` never imports it.

    app.py          create_app: the routes, API keys, errors in OpenAI's shape
    protocol.py     the Completions API's request body, SamplingParams from it, the answers' shapes
    completions.py  one completion request: a JSON body, or server-sent events
    engine_loop.py  the one thread that steps the engine, and the handoff from the event loop
    metrics.py      Prometheus metrics, in a registry per app
    serving.py      uvicorn: the listening socket, a shutdown that ends the engine's requests first
    errors.py       APIError: an HTTP status and OpenAI's error object
"""

from .app import create_app
from .serving import Server, listen, make_server, serve

__all__ = ["Server", "create_app", "listen", "make_server", "serve"]
