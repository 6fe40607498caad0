"""One model's llama.cpp state, driven from the worker thread: the loaded model, its context with many sequences over
one unified KV cache, the batch, the queued KV operations applied before a decode, and one ``llama_decode``."""

from __future__ import annotations

import ctypes

import llama_cpp as llama
import numpy as np

from ..base import EngineError, ModelInfo, PonderError
from ..cpu_check import use_extra_buffers
from .vocabulary import Vocabulary


class LlamaContext:
    """``model`` loaded with a context of at most ``n_ctx`` cells (less if the model was trained on fewer) for
    ``n_seq_max`` sequences; ``n_batch`` tokens per decode at most (at least one per sequence)."""

    def __init__(self, model: ModelInfo, *, n_ctx: int, n_seq_max: int, n_batch: int, n_threads: int):
        params = llama.llama_model_default_params()
        # False where llama.cpp's AMX or repacked-weight kernels die on this CPU (cpu_check.py asks a child once).
        params.use_extra_bufts = use_extra_buffers(model.path, threads=n_threads)
        self._model = llama.llama_model_load_from_file(model.path.encode(), params)
        if not self._model:
            raise PonderError(f"llama.cpp could not load {model.path} (not a valid GGUF model?)")
        self.vocab = Vocabulary(self._model, model.name)
        self.n_vocab = self.vocab.n_vocab
        self.n_embd = llama.llama_model_n_embd(self._model)
        self._embeddings = False  # llama_set_embeddings' current value
        n_ctx = min(n_ctx, llama.llama_model_n_ctx_train(self._model))
        cparams = llama.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_seq_max = n_seq_max
        cparams.kv_unified = True  # one pool of cells that sequences share: forks reuse the prompt's cells
        cparams.n_batch = cparams.n_ubatch = max(n_batch, n_seq_max)
        cparams.n_threads = cparams.n_threads_batch = n_threads
        cparams.pooling_type = llama.LLAMA_POOLING_TYPE_NONE  # embeddings, when on, are per token: the hidden states
        self._ctx = llama.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            llama.llama_model_free(self._model)
            raise PonderError(f"llama.cpp could not create a context with {n_ctx} cells and {n_seq_max} sequences")
        self._memory = llama.llama_get_memory(self._ctx)
        self.n_ctx = llama.llama_n_ctx(self._ctx)
        self.n_batch = cparams.n_batch
        self._batch = llama.llama_batch_init(self.n_batch, 0, 1)

    def apply_kv_ops(self, ops: list[tuple]) -> None:
        for op in ops:
            if op[0] == "cp":  # sequence op[1]'s cells before position op[3] (-1: all) join sequence op[2]
                llama.llama_memory_seq_cp(self._memory, op[1], op[2], 0, op[3])
            elif op[0] == "rm":
                llama.llama_memory_seq_rm(self._memory, op[1], -1, -1)
            elif op[0] == "rm_from":  # positions op[2].. of sequence op[1]: rejected drafts
                llama.llama_memory_seq_rm(self._memory, op[1], op[2], -1)
            elif op[0] == "save":  # copy the prompt of sequence op[1] out into cached prompt op[2], slot op[3]
                _, seq, entry, slot = op
                llama.llama_memory_seq_rm(self._memory, seq, len(entry.tokens), -1)  # the sequence is released next
                size = llama.llama_state_seq_get_size(self._ctx, seq)
                state = (ctypes.c_uint8 * size)()
                if llama.llama_state_seq_get_data(self._ctx, state, size, seq) != size:
                    raise EngineError(f"could not copy sequence {seq}'s prompt out of the KV cache")
                entry.states[slot] = state
            elif op[0] == "load":  # cached prompt op[2] (slot op[3]) into sequence op[1], keeping op[4] positions
                _, seq, entry, slot, keep = op
                state = entry.states[slot]
                if llama.llama_state_seq_set_data(self._ctx, state, len(state), seq) != len(state):
                    raise EngineError(f"could not copy a cached prompt into sequence {seq}")
                llama.llama_memory_seq_rm(self._memory, seq, keep, -1)
            else:
                llama.llama_memory_clear(self._memory, True)

    def decode(self, items: list[tuple[int, int, int, bool]], hidden: bool = False) -> np.ndarray:
        """One ``llama_decode`` of (token, position, sequence, wants logits) items; the logits rows asked for. With
        ``hidden`` every item must want logits, and the hidden states of all rows are in ``hidden_rows()``."""
        if hidden != self._embeddings:
            llama.llama_set_embeddings(self._ctx, hidden)
            self._embeddings = hidden
        batch = self._batch
        for i, (token, pos, seq, logits) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.seq_id[i][0], batch.logits[i] = (
                token, pos, 1, seq, logits)
        batch.n_tokens = len(items)
        rc = llama.llama_decode(self._ctx, batch)
        if rc != 0:
            raise EngineError(f"llama_decode returned {rc} (no room in the KV cache or a bad batch)")
        n_out = sum(1 for item in items if item[3])
        if hidden:
            assert n_out == len(items), "a step with embeddings on must ask for every row"
            self._n_rows = n_out
        return np.ctypeslib.as_array(llama.llama_get_logits(self._ctx), shape=(n_out, self.n_vocab))

    def hidden_rows(self) -> np.ndarray:
        """The final hidden states of the last decode's rows (a view: copy what you keep)."""
        return np.ctypeslib.as_array(llama.llama_get_embeddings(self._ctx), shape=(self._n_rows, self.n_embd))

    def close(self) -> None:
        if self._ctx:
            llama.llama_batch_free(self._batch)
            llama.llama_free(self._ctx)
            llama.llama_model_free(self._model)
            self._ctx = self._model = None
