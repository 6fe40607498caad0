"""Request and response bodies of the OpenAI-compatible API (pydantic), the OpenAI-style error, and request parsing.

Requests ignore fields they do not know (as OpenAI-compatible servers usually do) but validate every field ponder
uses; a bad value becomes a 400 that names the field. ``parse_request`` counts the messages and stop strings before
validating them: validation costs the event loop time per item, so a body of thousands of tiny messages is refused
for its count instead.
"""

from __future__ import annotations

import gc
import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..engine.base import Usage

MAX_N = 64  # branches of one request; the in-process engine holds 64 sequences by default
MAX_TOKENS = 32768  # per branch; the engine still refuses what does not fit its context
MAX_BUDGET = 10_000_000
MAX_CONTENT_PARTS = 64  # text parts of one message
RETRY_AFTER_S = 1  # the Retry-After of a 429: the server is busy now, not for long


class ApiError(Exception):
    """An error the client caused (or may retry): becomes ``{"error": {...}}`` with this status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers  # of the response, e.g. Retry-After

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def parse_request(raw: bytes, *, max_messages: int, max_stop: int) -> ChatCompletionRequest:
    """A chat-completion request from its JSON body; every problem is a 400 ``ApiError`` naming the field."""
    try:
        payload = _json_without_gc(raw)
    except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
        raise ApiError(400, f"malformed JSON body: {exc}", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "malformed JSON body: nested too deeply", code="invalid_json") from None
    if isinstance(payload, dict):
        messages, stop = payload.get("messages"), payload.get("stop")
        if isinstance(messages, list) and len(messages) > max_messages:
            raise ApiError(400, f"at most {max_messages} messages per request, got {len(messages)}",
                           param="messages", code="too_many_messages")
        if isinstance(stop, list) and len(stop) > max_stop:
            raise ApiError(400, f"at most {max_stop} stop strings, got {len(stop)}", param="stop")
    try:
        return ChatCompletionRequest.model_validate(payload)
    except ValidationError as exc:
        raise invalid_request(exc.errors()) from None


def _json_without_gc(raw: bytes) -> Any:
    """``json.loads`` with the cyclic garbage collector paused: JSON makes no reference cycles, so the collections
    its allocations would trigger find nothing, and they tripled the time a body of many small arrays took (about
    140 ms instead of 45 ms per MiB, all of it on the event loop)."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        return json.loads(raw)
    finally:
        if collecting:
            gc.enable()


def invalid_request(errors: list[dict]) -> ApiError:
    """The first of pydantic's (or FastAPI's) validation errors as a 400 naming its field."""
    first = errors[0]
    where = [str(part) for part in first["loc"] if part != "body"]
    param = ".".join(where) or None
    return ApiError(400, f"{param or 'body'}: {first['msg']}", param=param)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | Annotated[list[TextPart], Field(max_length=MAX_CONTENT_PARTS)] | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "\n".join(part.text for part in self.content)
        return self.content or ""


class PonderOptions(BaseModel):
    """The ``ponder`` field of a request. Keys other than these are options of the chosen strategy, checked against
    its signature (``strategy_call.py``)."""

    model_config = ConfigDict(extra="allow")

    strategy: str | None = None
    n: int | None = Field(None, ge=1, le=MAX_N)
    budget: int | None = Field(None, ge=1, le=MAX_BUDGET)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(None, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # OpenAI's knob for how much a reasoning model thinks: it sets the effort of strategies that take one (auto);
    # others ignore it, as OpenAI's non-reasoning models do. "minimal" is OpenAI's name below "low".
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None
    ponder: PonderOptions | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ponder"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose KV cells came from the engine's prefix cache


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None

    @classmethod
    def of(cls, usage: Usage) -> CompletionUsage:
        """OpenAI's usage of a request from ponder's account: prompt tokens are the prompts, appended and scored
        text (everything the model read), completion tokens every branch's sampled tokens, and the cached tokens
        the part of the prompt tokens that the prefix cache held."""
        prompt_tokens = usage.prompt_tokens + usage.scored_tokens
        return cls(prompt_tokens=prompt_tokens, completion_tokens=usage.generated_tokens,
                   total_tokens=prompt_tokens + usage.generated_tokens,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=usage.prompt_tokens_cached))


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: CompletionUsage
    ponder: dict[str, Any]


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: CompletionUsage | None = None
    ponder: dict[str, Any] | None = None
