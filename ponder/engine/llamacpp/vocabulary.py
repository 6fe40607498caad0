"""One model's vocabulary through llama.cpp: tokenizing, token text (and the incremental UTF-8 decoding of sampled
tokens into a branch's text), the chat template from the GGUF metadata; and llama.cpp's log, kept quiet."""

from __future__ import annotations

import codecs
import ctypes
import os
import sys
from typing import Sequence

import llama_cpp as llama

from ..base import Message, PonderError
from .jobs import LlamaBranch


@llama.llama_log_callback
def _llama_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    if os.environ.get("PONDER_VERBOSE"):
        sys.stderr.write(text.decode("utf-8", errors="replace"))


def quiet_llama_log() -> None:
    """Send llama.cpp's log to stderr only with PONDER_VERBOSE set: its load log (and a harmless vocabulary warning
    about the bundled models) is noise to a user."""
    llama.llama_log_set(_llama_log, ctypes.c_void_p(0))


class Vocabulary:
    """The vocabulary of a loaded llama.cpp model (``model`` is its ``llama_model`` handle, ``name`` its name)."""

    def __init__(self, model, name: str):
        self._model = model
        self.name = name
        self.handle = llama.llama_model_get_vocab(model)
        self.n_vocab = llama.llama_vocab_n_tokens(self.handle)
        self._chat_format = self._load_chat_template()
        self._pieces: dict[int, bytes] = {}  # token -> its bytes, filled as tokens are first generated

    def _load_chat_template(self):
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = self._meta("tokenizer.chat_template")
        if template is None:
            return None
        eos = self.token_text(llama.llama_vocab_eos(self.handle), special=True)
        bos_id = llama.llama_vocab_bos(self.handle)
        bos = self.token_text(bos_id, special=True) if bos_id >= 0 else ""
        return Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos, add_generation_prompt=True)

    def _meta(self, key: str) -> str | None:
        size = llama.llama_model_meta_val_str(self._model, key.encode(), None, 0)
        if size < 0:
            return None
        buf = ctypes.create_string_buffer(size + 1)
        llama.llama_model_meta_val_str(self._model, key.encode(), buf, size + 1)
        return buf.value.decode("utf-8", errors="replace")

    def format_chat(self, messages: Sequence[Message]) -> str:
        if self._chat_format is None:
            raise PonderError(f"{self.name} has no chat template in its GGUF metadata; pass a raw prompt")
        return self._chat_format(messages=list(messages)).prompt

    def tokenize(self, text: str, *, special: bool = True, add_bos: bool = False) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buf = (llama.llama_token * capacity)()
        n = llama.llama_tokenize(self.handle, data, len(data), buf, capacity, add_bos, special)
        if n < 0:
            raise PonderError(f"tokenizer failed on a text of {len(data)} bytes")
        return list(buf[:n])

    def token_bytes(self, token: int, *, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = llama.llama_token_to_piece(self.handle, token, buf, len(buf), 0, special)
        if n < 0:  # piece longer than the buffer: -n is the size needed
            buf = ctypes.create_string_buffer(-n)
            n = llama.llama_token_to_piece(self.handle, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def token_text(self, token: int, *, special: bool = False) -> str:
        return self.token_bytes(token, special=special).decode("utf-8", errors="replace")

    def append_token(self, branch: LlamaBranch, token: int) -> str:
        """Add ``token`` to the branch's tokens and text; return the new text."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        decoder.setstate(branch.utf8_state)
        if token not in self._pieces:
            self._pieces[token] = self.token_bytes(token)
        piece = decoder.decode(self._pieces[token])
        branch.utf8_state = decoder.getstate()
        branch.tokens.append(token)
        branch.text += piece
        return piece
