"""The HTTP app: OpenAI's Completions API, the Copilot (FauxPilot) route, models, health and metrics.

`create_app(engine, model_name=...)` builds a FastAPI app around an engine;
its lifespan starts the engine thread and stops it (in-flight requests are
ended, the thread joined). Every error is answered in OpenAI's shape
(`{"error": {"message", "type", "param", "code"}}`): 400 for a bad value or
body, 401 without the API key, 404 for an unknown model or route, 413 for a
body over the limit, 503 with Retry-After when too many requests wait.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Optional

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from .. import __version__
from .completions import Completer
from .engine_loop import EngineLoop
from .errors import SERVER_ERROR, APIError, error_body
from .metrics import ServerMetrics
from .protocol import CompletionJob, completion_job, parse_completion_request

logger = logging.getLogger("fastcodegen.server")

# The engine names Copilot-style clients put in the route (FauxPilot's), besides the served model's name.
COPILOT_ENGINES = ("codegen", "copilot-codex")
DEFAULT_MAX_WAITING = 1024
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class ServerSettings:
    """What `create_app` was asked for."""

    model_name: str
    api_key: Optional[str] = None
    max_waiting: int = DEFAULT_MAX_WAITING  # requests waiting for the engine before new ones get a 503
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES

    def __post_init__(self) -> None:
        if not isinstance(self.model_name, str) or not self.model_name:
            raise ValueError(f"model_name must be a non-empty string, got {self.model_name!r}")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise ValueError("api_key must be a non-empty string or None")
        for name in ("max_waiting", "max_body_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


def create_app(
    engine,
    *,
    model_name: str,
    api_key: Optional[str] = None,
    max_waiting: int = DEFAULT_MAX_WAITING,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> FastAPI:
    """A FastAPI app serving `engine` as `model_name`.

    Args:
        engine: the Engine to serve; while the app runs, only its engine
            thread may step it.
        model_name: the model's name in requests and in `/v1/models`.
        api_key: when set, `/v1/` routes need `Authorization: Bearer <api_key>`.
        max_waiting: requests that may wait for the engine (received, or
            queued and not yet scheduled); past it, new ones get a 503.
        max_body_bytes: the largest request body; larger ones get a 413.
    """
    settings = ServerSettings(model_name, api_key, max_waiting, max_body_bytes)
    engine_loop = EngineLoop(engine, settings.max_waiting)
    metrics = ServerMetrics(engine_loop)
    complete = Completer(engine_loop, metrics, settings.model_name)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine_loop.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine_loop.stop)

    # No generated docs: the API is OpenAI's, documented there and in the README.
    app = FastAPI(
        title="fastcodegen", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.engine_loop = engine_loop
    app.state.metrics = metrics
    app.state.settings = settings
    if settings.api_key is not None:
        app.add_middleware(BearerAuth, api_key=settings.api_key)
    _add_error_handlers(app)

    def model_card() -> dict:
        return {
            "id": settings.model_name,
            "object": "model",
            "created": created,
            "owned_by": "fastcodegen",
            "max_model_len": engine.config.max_model_len,
        }

    async def job_of(request: Request) -> CompletionJob:
        body = await _read_body(request, settings.max_body_bytes)
        req = parse_completion_request(body)
        if "engine_name" not in request.path_params and req.model not in (None, settings.model_name):
            raise _unknown_model(req.model, "model")
        return completion_job(req, engine.config.max_model_len)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await complete(request, await job_of(request))

    @app.post("/v1/engines/{engine_name}/completions")
    async def engine_completions(engine_name: str, request: Request) -> Response:
        # The engine in the route names the model; a `model` in the body is ignored, as Copilot clients expect.
        if engine_name not in COPILOT_ENGINES and engine_name != settings.model_name:
            raise _unknown_model(engine_name, "engine")
        return await complete(request, await job_of(request))

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model_info(model: str) -> dict:
        if model != settings.model_name:
            raise _unknown_model(model, "model")
        return model_card()

    @app.get("/health")
    async def health() -> Response:
        if engine_loop.running:
            return JSONResponse({"status": "ok"})
        reason = f"the engine failed: {engine_loop.failed}" if engine_loop.failed else "the server is not running"
        return JSONResponse(error_body(reason, type=SERVER_ERROR), status_code=503)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        content, content_type = metrics.render()
        return Response(content, media_type=content_type)

    return app


def _unknown_model(name: str, param: str) -> APIError:
    return APIError(404, f"the model {name!r} does not exist", param=param, code="model_not_found")


async def _read_body(request: Request, limit: int) -> bytes:
    """The request's body, at most `limit` bytes (else a 413)."""
    too_large = APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
    except ClientDisconnect:
        raise APIError(400, "the client disconnected before sending the whole body") from None
    return b"".join(chunks)


def _add_error_handlers(app: FastAPI) -> None:
    """Every error answered in OpenAI's shape."""

    async def api_error(request: Request, e: APIError) -> Response:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    async def http_error(request: Request, e: HTTPException) -> Response:
        message = {404: f"no route {request.method} {request.url.path}"}.get(e.status_code, str(e.detail))
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(error_body(message, code=code), status_code=e.status_code, headers=e.headers)

    async def validation_error(request: Request, e: RequestValidationError) -> Response:
        first = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x not in ("body", "path", "query")]
        return JSONResponse(
            error_body(f"{'.'.join(loc)}: {first.get('msg', 'invalid request')}", param=loc[0] if loc else None),
            status_code=400,
        )

    async def internal_error(request: Request, e: Exception) -> Response:
        logger.error("internal error answering %s %s", request.method, request.url.path, exc_info=e)
        return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", type=SERVER_ERROR), status_code=500)

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, internal_error)


class BearerAuth:
    """ASGI middleware: `/v1/` routes need `Authorization: Bearer <api_key>` (health and metrics do not)."""

    def __init__(self, app, api_key: str):
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/") and not self._authorized(scope):
            response = JSONResponse(
                error_body("a valid API key is needed: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key"),
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )  # fmt: skip
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope) -> bool:
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        scheme, _, token = given.partition(b" ")
        return hmac.compare_digest(b"Bearer " + token.strip(), self._expected) and scheme.lower() == b"bearer"
