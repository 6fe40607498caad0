"""``LlamaCppEngine``: the in-process engine's ``Engine``, holding one ``ModelRunner`` per loaded model and the one
scheduler that decodes them all (see the package docstring)."""

from __future__ import annotations

import asyncio
import os
from typing import Callable, Sequence

import llama_cpp as llama
import numpy as np

from ..base import Branch, Engine, EngineStats, Message, ModelInfo, PonderError, SamplingParams, StopIf, Usage
from ..prefix_cache import PREFIX_CACHE_TOKENS
from .jobs import LlamaBranch
from .runner import ModelRunner
from .scheduler import Scheduler
from .speculative import DRAFT_K_MAX
from .vocabulary import quiet_llama_log


class LlamaCppEngine(Engine):
    """Every model of a process on one scheduler and one worker thread; see the package docstring.

    ``resolve_model`` turns the name of a model a branch asks for (``open(..., model=)``) into its GGUF file
    (``ponder.models.resolve_model``)."""

    def __init__(self, model: ModelInfo, *, resolve_model: Callable[[str], ModelInfo],
                 draft: ModelInfo | None = None, n_ctx: int = 32768, n_seq_max: int = 64, n_batch: int = 512,
                 n_threads: int | None = None, seed: int | None = None, stall_timeout_s: float = 60.0,
                 prefix_cache_tokens: int = PREFIX_CACHE_TOKENS):
        if prefix_cache_tokens < 0:
            raise PonderError(f"prefix_cache_tokens must be 0 (no prefix cache) or more, got {prefix_cache_tokens}")
        self.model = model
        self.seed = seed
        self._resolve_model = resolve_model
        self._runner_options = dict(n_ctx=n_ctx, n_seq_max=n_seq_max, n_batch=n_batch,
                                    n_threads=n_threads or os.cpu_count() or 1,
                                    prefix_cache_tokens=prefix_cache_tokens)
        quiet_llama_log()
        llama.llama_backend_init()
        self._scheduler = Scheduler(lambda: self._loaded, stall_timeout_s)
        self._runners: dict[str, ModelRunner] = {}
        self._loading: asyncio.Lock | None = None
        target = self._load(model)
        if draft is not None:
            if draft.name == model.name:
                raise PonderError(f"the draft model must differ from the target ({model.name})")
            draft_runner = self._load(draft, margin=n_seq_max * (DRAFT_K_MAX + 2))
            if draft_runner.n_vocab != target.n_vocab:
                raise PonderError(f"{draft.name} cannot draft for {model.name}: their vocabularies differ "
                                  f"({draft_runner.n_vocab} and {target.n_vocab} tokens)")
            target.draft = draft_runner
            # No prefix cache of the draft's own: the target's cached prompts keep their shadows' KV too.
            draft_runner.prefix_cache = None
        self.draft = draft

    def _load(self, model: ModelInfo, margin: int = 0) -> ModelRunner:
        options = dict(self._runner_options)
        options["n_ctx"] += margin
        runner = ModelRunner(self, self._scheduler, model, **options)
        self._runners[model.name] = runner
        return runner

    async def _runner_for(self, name: str | None) -> ModelRunner:
        """The runner of model ``name`` (a bundled name or GGUF path, resolved by ``resolve_model``), loaded on the
        worker the first time."""
        if name is None:
            return self._runners[self.model.name]
        if name in self._runners:
            return self._runners[name]
        if self._loading is None:
            self._loading = asyncio.Lock()
        async with self._loading:
            loop = asyncio.get_running_loop()
            info = await loop.run_in_executor(self._scheduler.executor, self._resolve_model, name)
            if info.name not in self._runners:
                runner = await loop.run_in_executor(self._scheduler.executor, self._load, info)
                if runner.n_vocab != self._default.n_vocab:
                    del self._runners[info.name]
                    runner.close()
                    raise PonderError(f"{info.name} and {self.model.name} do not share a vocabulary; one engine "
                                      f"only holds models that do")
            self._runners[name] = self._runners[info.name]
            return self._runners[name]

    @property
    def _default(self) -> ModelRunner:
        return self._runners[self.model.name]

    # The default model's text functions and sizes (benchmarks and tools read them).
    def format_chat(self, messages: Sequence[Message]) -> str:
        return self._default.vocab.format_chat(messages)

    def tokenize(self, text: str, *, special: bool = True, add_bos: bool = False) -> list[int]:
        return self._default.vocab.tokenize(text, special=special, add_bos=add_bos)

    def token_text(self, token: int, *, special: bool = False) -> str:
        return self._default.vocab.token_text(token, special=special)

    @property
    def n_vocab(self) -> int:
        return self._default.n_vocab

    @property
    def n_ctx(self) -> int:
        return self._default.n_ctx

    @property
    def n_seq_max(self) -> int:
        return self._default.n_seq_max

    @property
    def n_batch(self) -> int:
        return self._default.n_batch

    @property
    def _loaded(self) -> list[ModelRunner]:
        """Each loaded model's runner once (a model asked for by its path is also listed under its name)."""
        return list(dict.fromkeys(self._runners.values()))

    # ---- the Branch API --------------------------------------------------------------------------------------

    async def open(self, prompt: str | Sequence[Message], usage: Usage | None = None, *,
                   model: str | None = None) -> Branch:
        runner = await self._runner_for(model)
        # Rendering and tokenizing grow with the prompt: off the event loop, which keeps answering other clients.
        # llama_tokenize only reads the vocabulary (and ctypes releases the GIL), so it may run beside a decode.
        tokens = await asyncio.to_thread(runner.prompt_tokens, prompt)
        return await runner.open(tokens, usage if usage is not None else Usage())

    async def fork(self, branch: Branch, n: int) -> list[Branch]:
        assert isinstance(branch, LlamaBranch)
        return await branch.runner.fork(branch, n)

    async def extend(self, branch: Branch, params: SamplingParams, stop_if: StopIf | None = None) -> Branch:
        assert isinstance(branch, LlamaBranch)
        return await branch.runner.extend(branch, params, stop_if)

    async def append(self, branch: Branch, text: str) -> Branch:
        assert isinstance(branch, LlamaBranch)
        return await branch.runner.append(branch, text)

    async def score(self, branch: Branch, continuation: str) -> float:
        assert isinstance(branch, LlamaBranch)
        return await branch.runner.score(branch, continuation)

    async def hidden(self, branch: Branch) -> np.ndarray:
        assert isinstance(branch, LlamaBranch)
        return await branch.runner.hidden(branch)

    def model_info(self, name: str | None = None) -> ModelInfo:
        """The ModelInfo of a loaded model (by the name a branch carries; None: the default model)."""
        return self._runners[name or self.model.name].model

    def release(self, branch: Branch) -> None:
        assert isinstance(branch, LlamaBranch)
        branch.runner.release(branch)

    def prefix_cache_tokens(self, model: str | None = None) -> int:
        """Prompt tokens whose KV the prefix cache of ``model`` (default: the engine's model) keeps."""
        cache = self._runners[model or self.model.name].prefix_cache
        return cache.tokens() if cache is not None else 0

    def clear_prefix_cache(self) -> None:
        """Forget every cached prompt of every model."""
        for runner in self._loaded:
            if runner.prefix_cache is not None:
                runner.prefix_cache.clear()

    def stats(self) -> EngineStats:
        total = EngineStats()
        for runner in self._loaded:
            s = runner.stats()
            for name in vars(total):
                setattr(total, name, getattr(total, name) + getattr(s, name))
        return total

    def close(self) -> None:
        if self._runners:
            self._scheduler.executor.shutdown(wait=True)
            for runner in self._loaded:
                runner.close()
            self._runners = {}

    def __enter__(self) -> LlamaCppEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
