"""Running the app under uvicorn: a listening socket, a server whose shutdown ends the engine's requests first.

uvicorn's graceful shutdown waits for every open response to finish; a
stream could run for its whole max_tokens. `Server` ends the engine's
requests as soon as the shutdown starts (streams get their last chunks and
`data: [DONE]`), so a SIGTERM or Ctrl-C stops the server within a step.
"""

from __future__ import annotations

import signal
import socket
import threading
from typing import Optional

import uvicorn

from .app import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_WAITING, create_app

# How long uvicorn waits for connections to close once the engine's requests have ended.
GRACEFUL_SHUTDOWN_S = 10


class Server(uvicorn.Server):
    """uvicorn's server for an app of `create_app`: its shutdown first ends the requests the engine runs."""

    def __init__(self, config: uvicorn.Config):
        super().__init__(config)
        self._engine_loop = config.app.state.engine_loop

    async def shutdown(self, sockets: Optional[list[socket.socket]] = None) -> None:
        self._engine_loop.begin_stop()
        await super().shutdown(sockets=sockets)


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: a free one), so that a port in use is an OSError before anything runs."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    return socket.create_server((host, port), family=family)


def make_server(app, *, log_level: str = "info", access_log: bool = True) -> Server:
    """A uvicorn server for an app of `create_app`; run it with `server.run(sockets=[listen(host, port)])`."""
    config = uvicorn.Config(
        app, log_level=log_level, access_log=access_log, lifespan="on", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S
    )
    return Server(config)


def serve(
    engine,
    sock: socket.socket,
    *,
    model_name: str,
    api_key: Optional[str] = None,
    max_waiting: int = DEFAULT_MAX_WAITING,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    log_level: str = "info",
) -> None:
    """Serves `engine` on a listening socket until SIGTERM or SIGINT (Ctrl-C); returns after a graceful stop."""
    app = create_app(
        engine, model_name=model_name, api_key=api_key, max_waiting=max_waiting, max_body_bytes=max_body_bytes
    )
    server = make_server(app, log_level=log_level)
    if threading.current_thread() is not threading.main_thread():
        server.run(sockets=[sock])
        return
    # uvicorn handles SIGINT and SIGTERM while it serves, then restores the handlers it found and raises the
    # signal again. Handlers that ignore that second delivery make a signalled stop an ordinary return.
    previous = {s: signal.signal(s, _after_shutdown) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _after_shutdown(signum, frame) -> None:
    """The stop signal again, once uvicorn has stopped: already handled."""
