"""The OpenAI-compatible HTTP API over one engine: ``create_app(engine)`` returns a FastAPI app.

Every request runs its strategy as a coroutine on the server's event loop, so the branches of all concurrent requests
are decoded by the same engine in the same batch. A request is answered only once its strategy has decided (a
strategy votes over finished branches), which lets every failure, streaming or not, be a proper HTTP status with an
OpenAI-style error body; a client that disconnects while it waits has its strategy cancelled, and the strategy's
``finally`` blocks release its branches and their KV cells. Hostile or broken clients meet the guards of
``guards.py`` (bounded bodies, deadlines, a per-client cap) before a request gets here; what a request costs the
event loop before its strategy starts (parsing, checks) is bounded by the body limit.

Once parsed, a request starts only if its client has a token left in its ``StartLimit`` bucket (admission.py); a run
the client throws away (it disconnects, stops reading, or sends a prompt too long for the context) spends one. Its
prompt is then measured against the context by ``ContextCheck``, which tokenizes no more of it than it takes to
tell.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
import uuid
from dataclasses import replace
from typing import Awaitable, TypeVar

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from ..engine.base import Engine, EngineError, PonderError, PromptTooLongError, RemoteUnavailableError
from ..result import Result
from ..strategies import STRATEGIES, StrategyCall
from .admission import Admission, StartLimit
from .config import ServerConfig
from .guards import BodyLimit, ClientCap, ContextCheck, client_of, error_response, prompt_chars_that_fit
from .metrics import CountResponses, ServerMetrics
from .schemas import (ApiError, AssistantMessage, ChatCompletion, ChatCompletionChunk, Choice, ChunkChoice, ChunkDelta,
                      CompletionUsage, ModelCard, ModelList, invalid_request, parse_request)
from .strategy_call import plan_call

log = logging.getLogger("ponder.server")
T = TypeVar("T")
CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away before the answer"


class ClientDisconnected(Exception):
    pass


def create_app(engine: Engine, config: ServerConfig | None = None) -> FastAPI:
    config = config or ServerConfig()
    if config.max_prompt_chars is None:
        config = replace(config, max_prompt_chars=prompt_chars_that_fit(engine))
    admission = Admission(config.max_running, config.max_queue)
    starts = StartLimit(config.client_rate_per_min, config.client_burst)
    context = ContextCheck.of(engine)
    metrics = ServerMetrics(engine, admission)
    started = int(time.time())
    app = FastAPI(title="ponder", summary="Inference-time compute behind the OpenAI API")
    # The last added is the outermost: count every response, refuse a busy client before reading its body.
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes, timeout_s=config.body_timeout_s)
    app.add_middleware(ClientCap, limit=config.max_per_client)
    app.add_middleware(CountResponses, metrics=metrics)
    _install_error_handlers(app)

    def require_api_key(authorization: str | None = Header(None)) -> None:
        if config.api_key is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), config.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           type="authentication_error", code="invalid_api_key")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": engine.model.name}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(require_api_key)])
    async def list_models() -> ModelList:
        name = engine.model.name
        ids = [name] + [f"{strategy}/{name}" for strategy in sorted(STRATEGIES)]
        return ModelList(data=[ModelCard(id=i, created=started) for i in ids])

    @app.post("/v1/chat/completions", dependencies=[Depends(require_api_key)], response_model=None)
    async def chat_completions(request: Request) -> Response:
        body = parse_request(await request.body(), max_messages=config.max_messages, max_stop=config.max_stop)
        call = plan_call(body, engine.model.name, config)
        client = client_of(request.scope)
        starts.check(client)
        texts = [message.text for message in body.messages]
        try:
            result, queued_s = await _until_disconnected(request, _run(call, texts, engine, admission, context))
        except ClientDisconnected:
            log.info("client disconnected; its %s run was cancelled", call.strategy.name)
            starts.spend(client)
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        except ApiError as exc:
            if exc.code == "context_length_exceeded":
                starts.spend(client)
            raise
        answer = _answer(body.model, call, result, queued_s)
        metrics.prompt_tokens.inc(answer.usage.prompt_tokens)
        metrics.completion_tokens.inc(answer.usage.completion_tokens)
        if not body.stream:
            return JSONResponse(answer.model_dump())
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        delivered = False

        async def events():
            nonlocal delivered
            async for event in _sse(answer, include_usage):
                yield event
            # Asked before the response ends (after, every client looks gone). uvicorn's send returns quietly once
            # the client is gone, so a stream whose client was dropped may have run to its end as well.
            delivered = not await request.is_disconnected()

        def spend_unless_delivered() -> None:  # after the stream: run to its end, or cut when the client went
            if not delivered:
                starts.spend(client)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                 background=BackgroundTask(spend_unless_delivered))

    return app


async def _run(call: StrategyCall, texts: list[str], engine: Engine, admission: Admission,
               context: ContextCheck | None) -> tuple[Result, float]:
    try:
        if context is not None:
            await context.check(texts)  # before a run slot: a prompt that cannot fit never holds one
        queued_at = time.perf_counter()
        async with admission.slot():
            queued_s = time.perf_counter() - queued_at
            return await call(engine), queued_s
    except PromptTooLongError as exc:
        raise ApiError(400, str(exc), param="messages", code="context_length_exceeded") from None
    except RemoteUnavailableError as exc:
        raise ApiError(503, str(exc), type="server_error", code="upstream_unavailable") from None
    except EngineError:
        log.exception("engine failure")  # a 500 carries no internals; the log keeps them
        raise ApiError(500, "the engine failed while answering; see the server log", type="server_error") from None
    except PonderError as exc:
        raise ApiError(400, str(exc)) from None


async def _until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client disconnects first, cancel it, wait until it has cleaned up, and raise
    ``ClientDisconnected``."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})  # the strategy's finally blocks release its branches
    if task.cancelled():
        raise ClientDisconnected
    return task.result()


async def _disconnect(request: Request) -> None:
    # The body has been read, so the next ASGI message is the disconnect (uvicorn sends nothing else).
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _answer(model: str, call: StrategyCall, result: Result, queued_s: float) -> ChatCompletion:
    chosen = next((i for i, b in enumerate(result.branches) if result.answer is not None and b.answer == result.answer),
                  0 if result.branches else None)
    branch = result.branches[chosen] if chosen is not None else None
    details = result.to_dict()
    for summary in details["branches"]:
        del summary["text"]  # the chosen text is message.content; the others would make the answer huge
    details.update(chosen_branch=chosen, n=call.n)
    details["usage"]["queued_s"] = round(queued_s, 4)
    return ChatCompletion(
        id=f"chatcmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=model,
        choices=[Choice(message=AssistantMessage(content=branch.text if branch else ""),
                        finish_reason="length" if branch and branch.finish_reason == "length" else "stop")],
        usage=CompletionUsage.of(result.usage),
        ponder=details,
    )


async def _sse(answer: ChatCompletion, include_usage: bool):
    """The decided answer as chat.completion.chunk events: role, the text word by word, the finish, [DONE]."""
    choice = answer.choices[0]

    def event(choices: list[ChunkChoice], **extra) -> str:
        chunk = ChatCompletionChunk(id=answer.id, created=answer.created, model=answer.model, choices=choices,
                                    **extra)
        return f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"

    yield event([ChunkChoice(delta=ChunkDelta(role="assistant", content=""))])
    for piece in re.findall(r"\s*\S+|\s+$", choice.message.content):
        yield event([ChunkChoice(delta=ChunkDelta(content=piece))])
    yield event([ChunkChoice(delta=ChunkDelta(), finish_reason=choice.finish_reason)], ponder=answer.ponder)
    if include_usage:
        yield event([], usage=answer.usage)
    yield "data: [DONE]\n\n"


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def request_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(invalid_request(exc.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        error = ApiError(exc.status_code, str(exc.detail), code=str(exc.status_code))
        return JSONResponse(error.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        error = ApiError(500, "internal server error (details are in the server log)", type="server_error")
        return JSONResponse(error.body(), status_code=500)
