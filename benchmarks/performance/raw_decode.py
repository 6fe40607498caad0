"""Raw llama.cpp speed of whatever llama-cpp-python the running interpreter has: prefill and batched decode.

It is llama.cpp's ``batched`` example: one prompt evaluated once, its KV copied to N sequences, then one
``llama_decode`` per step for all N (greedy). Prints one JSON object::

    python -m benchmarks.performance.raw_decode MODEL.gguf [--n 1 16] [--steps 64] [--threads 2] [--no-extra-buffers]

It must keep needing only ``llama_cpp`` and ``numpy``, nothing of ponder or of this package: ``bench_builds`` runs it
by its file path (``python .../raw_decode.py MODEL.gguf ...``) in one virtualenv per llama.cpp build, where only the
build under test is installed.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import time

import llama_cpp as llama
import numpy as np

PROMPT = ("<|im_start|>user\nNatalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
          "May. How many clips did Natalia sell altogether in April and May? Reason step by step.<|im_end|>\n"
          "<|im_start|>assistant\n")


@llama.llama_log_callback
def _silent(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    pass


def measure(path: str, ns: list[int], steps: int, threads: int, extra_buffers: bool) -> dict:
    llama.llama_log_set(_silent, ctypes.c_void_p(0))
    llama.llama_backend_init()
    mparams = llama.llama_model_default_params()
    mparams.use_extra_bufts = extra_buffers
    start = time.perf_counter()
    model = llama.llama_model_load_from_file(path.encode(), mparams)
    load_s = time.perf_counter() - start
    vocab = llama.llama_model_get_vocab(model)
    n_vocab = llama.llama_vocab_n_tokens(vocab)
    n_max = max(ns)
    cparams = llama.llama_context_default_params()
    cparams.n_ctx = 512 + n_max * (steps + 8)
    cparams.n_seq_max = n_max
    cparams.kv_unified = True
    cparams.n_batch = cparams.n_ubatch = 512
    cparams.n_threads = cparams.n_threads_batch = threads
    ctx = llama.llama_init_from_model(model, cparams)
    memory = llama.llama_get_memory(ctx)
    text = PROMPT.encode()
    buf = (llama.llama_token * 512)()
    n_prompt = llama.llama_tokenize(vocab, text, len(text), buf, 512, False, True)
    prompt = list(buf[:n_prompt])
    batch = llama.llama_batch_init(512, 0, n_max)

    def decode(items: list[tuple[int, int, int]]) -> np.ndarray:
        """items: (token, position, sequence); logits of every item come back, one row each."""
        batch.n_tokens = len(items)
        for i, (token, pos, seq) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, True
            batch.seq_id[i][0] = seq
        if llama.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        rows = np.ctypeslib.as_array(llama.llama_get_logits(ctx), shape=(len(items) * n_vocab,))
        return rows.reshape(len(items), n_vocab)

    result = {"library": llama.__file__, "extra_buffers": extra_buffers, "load_s": round(load_s, 3),
              "prompt_tokens": n_prompt, "decode_tok_s": {}, "prefill_tok_s": None}
    for n in ns:
        llama.llama_memory_clear(memory, True)
        start = time.perf_counter()
        logits = decode([(t, p, 0) for p, t in enumerate(prompt)])
        prefill_s = time.perf_counter() - start
        if result["prefill_tok_s"] is None:
            result["prefill_tok_s"] = round(n_prompt / prefill_s, 1)
        for seq in range(1, n):
            llama.llama_memory_seq_cp(memory, 0, seq, -1, -1)
        tokens = [int(np.argmax(logits[-1]))] * n
        start = time.perf_counter()
        for step in range(steps):
            logits = decode([(tokens[s], n_prompt + step, s) for s in range(n)])
            tokens = [int(t) for t in np.argmax(logits, axis=1)]
        result["decode_tok_s"][str(n)] = round(n * steps / (time.perf_counter() - start), 1)
    llama.llama_batch_free(batch)
    llama.llama_free(ctx)
    llama.llama_model_free(model)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a GGUF file")
    parser.add_argument("--n", type=int, nargs="+", default=[1, 16], help="branches decoded together (default 1 16)")
    parser.add_argument("--steps", type=int, default=64, help="decode steps per N (default 64)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-extra-buffers", action="store_true",
                        help="load weights without llama.cpp's extra buffer types (AMX, repacked layouts)")
    args = parser.parse_args()
    print(json.dumps(measure(args.model, args.n, args.steps, args.threads, not args.no_extra_buffers)))


if __name__ == "__main__":
    main()
