"""Two bundled models in one engine: one worker, text carried across, speculative
decoding that is lossless and rolls back what it rejects. Short generations, a few seconds each."""

from __future__ import annotations

import asyncio
import threading
import time

import llama_cpp
import pytest

from ponder.engine import SamplingParams, Usage
from ponder.models import load_engine
from ponder.prompts import math_messages

pytestmark = pytest.mark.model

SMALL, LARGE = "qwen2.5-0.5b", "qwen2.5-1.5b"
QUESTION = "A baker makes 12 loaves a day and sells 9. How many loaves are left after 4 days?"
GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def both():
    """The 0.5B as the default model, the 1.5B loaded into the same engine on first use (no draft)."""
    engine = load_engine(SMALL, n_ctx=4096, n_seq_max=8)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def speculative():
    engine = load_engine(LARGE, draft=SMALL, n_ctx=4096, n_seq_max=8)
    yield engine
    engine.close()


async def greedy_tokens(engine, n: int, params=GREEDY, model=None, usage=None):
    root = await engine.open(math_messages(QUESTION), usage, model=model)
    forks = await root.fork(n)
    root.release()
    await asyncio.gather(*(b.extend(params) for b in forks))
    tokens = [b.tokens for b in forks]
    for b in forks:
        b.release()
    return tokens


def test_speculative_greedy_is_the_target_alone_token_for_token(both, speculative):
    (alone,) = run(greedy_tokens(both, 1, model=LARGE))
    usage = Usage()
    drafted = run(greedy_tokens(speculative, 4, usage=usage))  # several branches verified in one batch
    assert len(alone) == 32
    assert all(tokens == alone for tokens in drafted)
    assert usage.drafted_tokens > 0 and 0 < usage.accepted_tokens <= usage.drafted_tokens
    assert usage.models[SMALL]["drafted_tokens"] == usage.drafted_tokens
    assert usage.models[LARGE]["generated_tokens"] == 4 * 32
    assert speculative.stats().live_branches == 0 and speculative.stats().kv_cells_used == 0


def test_rejected_drafts_are_removed_from_both_caches(speculative):
    target = speculative._runners[LARGE]
    draft = speculative._runners[SMALL]

    async def go():
        usage = Usage()
        root = await speculative.open(math_messages(QUESTION), usage)
        forks = await root.fork(2)
        root.release()
        await asyncio.gather(*(b.extend(SamplingParams(temperature=1.5, top_k=0, top_p=1.0, max_tokens=40,
                                                       seed=i, ignore_eos=True)) for i, b in enumerate(forks)))
        for b in forks:  # the queued removals are applied before the next decode: run one to flush them
            await b.score(" ok")
        positions = [(llama_cpp.llama_memory_seq_pos_max(target.context._memory, b.seq_id), b.n_past,
                      llama_cpp.llama_memory_seq_pos_max(draft.context._memory, b.shadow.seq_id), b.shadow.n_past,
                      len(b.draft_behind)) for b in forks]
        lengths = [len(b.tokens) for b in forks]
        for b in forks:
            b.release()
        return usage, positions, lengths

    usage, positions, lengths = run(go())
    assert lengths == [40, 40]
    assert usage.accepted_tokens < usage.drafted_tokens  # at this temperature the draft was overruled
    for target_max, n_past, draft_max, shadow_past, behind in positions:
        assert target_max == n_past - 1  # no rejected token left in the target's cells
        assert draft_max == shadow_past - 1  # nor in the draft's
        assert shadow_past + behind == n_past  # the draft knows what it has yet to evaluate
    assert speculative.stats().kv_cells_used == 0


def test_one_worker_decodes_for_both_models_never_two_at_once(both, monkeypatch):
    real_decode = llama_cpp.llama_decode
    intervals, lock, active = [], threading.Lock(), [0]

    def decode(ctx, batch):
        with lock:
            active[0] += 1
            overlapping = active[0] > 1
        start = time.perf_counter()
        try:
            return real_decode(ctx, batch)
        finally:
            with lock:
                active[0] -= 1
            intervals.append((ctx, start, time.perf_counter(), overlapping))

    monkeypatch.setattr(llama_cpp, "llama_decode", decode)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)

    async def go():
        await asyncio.gather(greedy_tokens(both, 2, params), greedy_tokens(both, 2, params, model=LARGE))

    run(go())
    contexts = {ctx.value if hasattr(ctx, "value") else ctx for ctx, *_ in intervals}
    assert len(contexts) == 2  # both models decoded
    assert not any(overlapping for *_, overlapping in intervals)


def test_text_carried_to_the_other_model_continues_as_if_it_had_been_its_prompt(both):
    large = both._runners[LARGE] if LARGE in both._runners else None
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)

    async def go():
        usage = Usage()
        small = await both.open(math_messages(QUESTION), usage)
        await small.extend(SamplingParams(temperature=0.0, max_tokens=16))
        carried = await both.open(math_messages(QUESTION), usage, model=LARGE)
        before = usage.models[LARGE]["prompt_tokens"]
        await carried.append(small.text)
        appended = usage.models[LARGE]["prompt_tokens"] - before
        await carried.extend(params)
        # the same text as one prompt on a fresh branch of the large model
        runner = both._runners[LARGE]
        whole = await both.open(runner.vocab.format_chat(math_messages(QUESTION)) + small.text, model=LARGE)
        await whole.extend(params)
        result = (carried.text[len(small.text):], whole.text, appended, len(small.tokens), carried.appended_tokens)
        for b in (small, carried, whole):
            b.release()
        return result

    carried_text, whole_text, appended, small_tokens, appended_field = run(go())
    assert large is None or both._runners[LARGE] is large
    assert carried_text == whole_text
    assert appended == appended_field == small_tokens  # only the carried tokens were evaluated
    assert both.stats().live_branches == 0 and both.stats().kv_cells_used == 0
