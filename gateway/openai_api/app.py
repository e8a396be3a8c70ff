"""The Starlette app of the OpenAI-compatible front.

Each completion request becomes the ``GenerateRequest`` the gRPC front would get and runs
through :meth:`GatewayServicer.generate`, the gateway's one routing path. Before the first
message a failure is an HTTP status with OpenAI's error JSON (:data:`expertmesh.errors.HTTP_STATUS`);
after it, a last server-sent event carries the error. A client that goes away cancels the
request, which aborts it in the engine.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing, suppress
from typing import Any, TypeVar

import grpc
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from expertmesh.errors import (
    InvalidRequest,
    Unauthenticated,
    Unavailable,
    http_status,
    retry_after_s,
    status_for,
)
from expertmesh.v1 import expertmesh_pb2 as pb

from ..auth import TokensFile, bearer_token, current_tenant
from ..pool import Pool
from ..servicer import GatewayServicer
from .context import HttpCallContext
from .convert import AUTO, Answer, generate_request, route_headers
from .schema import ChatCompletionRequest, CompletionRequest

log = logging.getLogger(__name__)
#: A JSON body may be this many times ``limits.max_request_bytes`` (escapes, field names);
#: the request built from it is then held to the limit itself.
BODY_FACTOR = 2
DONE = b"data: [DONE]\n\n"
T = TypeVar("T")
Body = TypeVar("Body", bound=BaseModel)


class Disconnected(Exception):
    """The client closed the connection before the answer was complete."""


def error_body(exc: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """HTTP status, OpenAI's error JSON and headers (``Retry-After``) for ``exc``."""
    code, message = status_for(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.error("unexpected error in the HTTP front", exc_info=exc)
    status, kind = http_status(code)
    param = exc.param if isinstance(exc, BodyError) else None
    headers = {}
    retry = retry_after_s(exc)
    if retry is not None:
        headers["retry-after"] = str(max(math.ceil(retry), 1))
    return status, {"error": {"message": message, "type": kind, "param": param, "code": code.name}}, headers


def error_response(exc: BaseException) -> JSONResponse:
    """The HTTP answer for a failure before any message was sent."""
    status, body, headers = error_body(exc)
    return JSONResponse(body, status_code=status, headers=headers)


class BodyError(InvalidRequest):
    """The JSON body does not fit the schema; ``param`` names the field."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.param = param


def parse_body(raw: bytes, model: type[Body]) -> Body:
    """``model`` from the JSON body; BodyError names the first field at fault."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        if first["type"] == "extra_forbidden":
            message = f"unknown field {where!r}: this API does not support it"
        elif first["type"] == "json_invalid":
            message = f"the body is not valid JSON: {first['msg']}"
            where = ""
        else:
            text = first["msg"].removeprefix("Value error, ")  # a validator's own message
            message = f"{where}: {text}" if where else text
        raise BodyError(message, where or None) from None


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused once it passes ``limit`` bytes (never read whole first)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise InvalidRequest(f"the body is over {limit} bytes ({BODY_FACTOR} x limits.max_request_bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


async def wait_disconnect(receive: Receive) -> None:
    """Return when the client has gone away (ASGI ``http.disconnect``)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """``work``'s result; if the client goes away first, ``work`` is cancelled and Disconnected raised."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(wait_disconnect(receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this handler was cancelled (shutdown): so is its work
        task.cancel()
        raise
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
        raise Disconnected
    return task.result()


def sse(data: dict[str, Any]) -> bytes:
    """One server-sent event."""
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


class EventStream(Response):
    """A streamed completion: the first message decides the status (an error's, or 200 with
    the route headers), then one server-sent event per message. The whole stream is iterated
    in one task, and a client that goes away cancels it at once."""

    media_type = "text/event-stream"

    def __init__(self, answer: Answer, stream: AsyncIterator[pb.GenerateResponse], options: Any) -> None:
        super().__init__()
        self.answer = answer
        self.stream = stream
        self.include_usage = bool(options and options.include_usage)
        self.continuous = bool(options and options.continuous_usage_stats)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await unless_disconnected(receive, self._run(scope, receive, send))
        except Disconnected:
            log.info("client went away; request cancelled")

    async def _run(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with aclosing(self.stream):  # type: ignore[type-var]
            try:
                first = await _first(self.stream)
            except Exception as e:
                await error_response(e)(scope, receive, send)
                return
            headers = {
                "content-type": self.media_type,
                "cache-control": "no-cache",
                **route_headers(first.route),
            }
            raw = [(k.encode(), v.encode("latin-1")) for k, v in headers.items()]
            await send({"type": "http.response.start", "status": 200, "headers": raw})
            async for chunk in self._events(first):
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _events(self, first: pb.GenerateResponse) -> AsyncIterator[bytes]:
        """A chunk per message, the usage chunk when asked, ``[DONE]``."""
        last = first
        yield sse(self.answer.chunk(first, True, self.continuous))
        try:
            async for msg in self.stream:
                last = msg
                yield sse(self.answer.chunk(msg, False, self.continuous))
        except Exception as e:  # the status went out with the first message: say it in the stream
            _, body, _ = error_body(e)
            yield sse(body)
            yield DONE
            return
        if self.include_usage:
            yield sse(self.answer.usage_chunk(last))
        yield DONE


class OpenAIFront:
    """The routes, over one servicer (the gRPC front's), its pool and the tokens file."""

    def __init__(self, servicer: GatewayServicer, pool: Pool, tokens: TokensFile | None) -> None:
        self.servicer = servicer
        self.pool = pool
        self.tokens = tokens

    def app(self) -> Starlette:
        """The ASGI application."""
        return Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/health", self.health, methods=["GET"]),
            ]
        )

    def _tenant(self, request: Request) -> str | None:
        """The caller's tenant (None while auth is off); Unauthenticated without a known token."""
        if self.tokens is None:
            return None
        token = bearer_token(tuple(request.headers.items()))
        if token is None:
            raise Unauthenticated("this gateway needs an 'Authorization: Bearer <token>' header")
        tenant = self.tokens.tokens.tenant_of(token)
        if tenant is None:
            raise Unauthenticated("the bearer token is not valid")
        return tenant

    async def chat_completions(self, request: Request) -> Response:
        """``POST /v1/chat/completions``."""
        return await self._complete(request, ChatCompletionRequest)

    async def completions(self, request: Request) -> Response:
        """``POST /v1/completions``."""
        return await self._complete(request, CompletionRequest)

    async def _complete(
        self, request: Request, model: type[ChatCompletionRequest] | type[CompletionRequest]
    ) -> Response:
        config = self.servicer.router.config
        try:
            current_tenant.set(self._tenant(request))  # read by the routing path, as the gRPC front's
            raw = await read_body(request, BODY_FACTOR * config.limits.max_request_bytes)
            body = parse_body(raw, model)
            context = HttpCallContext(request)
            request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
            generate = generate_request(body, config, request_id)
        except Exception as e:
            return error_response(e)
        answer = Answer(isinstance(body, ChatCompletionRequest), request_id, body.logprob_count() is not None)
        stream = self.servicer.generate(generate, context)
        if body.stream:
            return EventStream(answer, stream, body.stream_options)
        try:
            messages = await unless_disconnected(request.receive, _all(stream))
        except Disconnected:
            return Response(status_code=499)  # nobody reads it; for the access log
        except Exception as e:
            return error_response(e)
        return JSONResponse(answer.whole(messages), headers=route_headers(messages[0].route))

    async def models(self, request: Request) -> Response:
        """``GET /v1/models``: the experts, the domains and ``auto`` (a tenant sees its own)."""
        try:
            tenant = self._tenant(request)
            allowed = self.servicer.tenants.state(tenant).config.domains if tenant is not None else []
        except Exception as e:
            return error_response(e)
        config = self.servicer.router.config
        experts = [e for e in config.experts if not allowed or e.domain in allowed]
        domains = [d for d in config.domains() if not allowed or d in allowed]

        def entry(name: str, kind: str, **extra: str) -> dict[str, Any]:
            return {
                "id": name,
                "object": "model",
                "created": 0,
                "owned_by": "expertmesh",
                "kind": kind,
                **extra,
            }

        data = [entry(e.expert_id, "expert", domain=e.domain) for e in experts]
        data += [entry(d, "domain") for d in domains]
        data.append(entry(AUTO, "auto"))
        return JSONResponse({"object": "list", "data": data})

    async def health(self, request: Request) -> Response:
        """``GET /health``: 200 while any expert can serve (open, like gRPC health)."""
        if any(link.serving for link in self.pool.links()):
            return JSONResponse({"status": "SERVING"})
        return JSONResponse({"status": "NOT_SERVING"}, status_code=503)


async def _first(stream: AsyncIterator[pb.GenerateResponse]) -> pb.GenerateResponse:
    try:
        return await anext(stream)
    except StopAsyncIteration:
        raise Unavailable("the expert ended the stream without a message") from None


async def _all(stream: AsyncIterator[pb.GenerateResponse]) -> list[pb.GenerateResponse]:
    async with aclosing(stream):  # type: ignore[type-var]
        messages = [msg async for msg in stream]
    if not messages:
        raise Unavailable("the expert ended the stream without a message")
    return messages
