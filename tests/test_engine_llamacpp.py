"""The real batched engine on the bundled 0.5B: short generations, a few seconds each."""

from __future__ import annotations

import asyncio

import pytest

from ponder.engine import PromptTooLongError, SamplingParams, Usage
from ponder.prompts import math_messages

pytestmark = pytest.mark.model

QUESTION = "What is 12 times 7?"
GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)


def run(coro):
    return asyncio.run(coro)


def test_forks_share_one_prefill(real_engine):
    async def go():
        before = real_engine.stats().prefills, real_engine.stats().prefill_tokens
        usage = Usage()
        root = await real_engine.open(math_messages(QUESTION), usage)
        forks = await root.fork(6)
        root.release()
        await asyncio.gather(*(b.extend(SamplingParams(max_tokens=4, seed=i)) for i, b in enumerate(forks)))
        for b in forks:
            b.release()
        after = real_engine.stats()
        return usage, after.prefills - before[0], after.prefill_tokens - before[1]

    usage, prefills, prefill_tokens = run(go())
    assert prefills == 1
    assert prefill_tokens == usage.prompt_tokens - 1  # the last prompt token is decoded with the first step
    assert usage.prompt_tokens_shared == 6 * (usage.prompt_tokens - 1)
    assert usage.generated_tokens <= 6 * 4


def test_batched_greedy_matches_single_stream(real_engine):
    async def go():
        root = await real_engine.open(math_messages(QUESTION))
        (single,) = await root.fork(1)
        await single.extend(GREEDY)  # alone in the batch
        batch = await root.fork(8)
        root.release()
        await asyncio.gather(*(b.extend(GREEDY) for b in batch))  # eight at once, one decode per step
        texts = [b.tokens for b in batch]
        for b in [single, *batch]:
            b.release()
        return single.tokens, texts

    single, batched = run(go())
    assert len(single) == 32
    for tokens in batched:
        assert tokens == single


def test_seeded_sampling_is_reproducible(real_engine):
    async def sample(seeds):
        root = await real_engine.open(math_messages(QUESTION))
        forks = await root.fork(len(seeds))
        root.release()
        await asyncio.gather(*(b.extend(SamplingParams(temperature=1.0, max_tokens=24, seed=s))
                               for b, s in zip(forks, seeds)))
        for b in forks:
            b.release()
        return [b.text for b in forks]

    first, second = run(sample([1, 2, 3])), run(sample([1, 2, 3]))
    assert first == second
    assert len(set(first)) > 1  # different seeds give different samples


def test_release_cancels_and_frees_kv(real_engine):
    async def go():
        base = real_engine.stats().kv_cells_used
        root = await real_engine.open(math_messages(QUESTION))
        forks = await root.fork(3)
        root.release()
        params = SamplingParams(max_tokens=200, ignore_eos=True)
        victim = forks[0]
        # halt the victim's sibling after 5 tokens, and release the victim from outside mid-decode
        tasks = [asyncio.create_task(b.extend(params)) for b in forks]
        while len(victim.tokens) < 5:
            await asyncio.sleep(0.01)
        victim.release()
        during = real_engine.stats()
        await tasks[0]
        for t in tasks[1:]:
            t.cancel()  # a caller that gives up: its branch is released too
        await asyncio.gather(*tasks[1:], return_exceptions=True)
        after = real_engine.stats()
        return base, victim, forks, during, after

    base, victim, forks, during, after = run(go())
    assert victim.finish_reason == "cancelled"
    assert len(victim.tokens) < 200
    assert during.live_branches >= 2
    assert all(b.released for b in forks)
    assert after.kv_cells_used == base
    assert after.live_branches == 0


def test_kv_full_makes_new_branches_wait():
    """With 256 cells, a ~50-token prompt and 4 branches of 80 tokens cannot all run at once: two wait for the first
    two to finish and be released, then run."""
    from ponder.engine import PonderError, load_engine

    async def extend_then_release(b, params):
        await b.extend(params)
        b.release()

    async def go(engine):
        root = await engine.open(math_messages(QUESTION))
        forks = await root.fork(4)
        root.release()
        params = SamplingParams(max_tokens=80, ignore_eos=True)
        tasks = [asyncio.create_task(extend_then_release(b, params)) for b in forks]
        while engine.stats().generated_tokens == 0:
            await asyncio.sleep(0.01)
        waiting = engine.stats().waiting
        await asyncio.gather(*tasks)
        return waiting, forks, engine.stats()

    async def stall(engine):
        # the same fork, but nobody releases finished branches: the waiting ones can never run
        root = await engine.open(math_messages(QUESTION))
        forks = await root.fork(4)
        root.release()
        try:
            await asyncio.gather(*(b.extend(SamplingParams(max_tokens=80, ignore_eos=True)) for b in forks))
        finally:
            for b in forks:
                b.release()

    with load_engine("qwen2.5-0.5b", n_ctx=256, n_seq_max=8, stall_timeout_s=1.0) as engine:
        waiting, forks, after = run(go(engine))
        with pytest.raises(PonderError, match="KV cache is full"):
            run(stall(engine))
        final = engine.stats()
    assert waiting == 2
    assert all(b.finish_reason == "length" and len(b.tokens) == 80 for b in forks)
    assert after.kv_cells_used == 0 and after.live_branches == 0
    assert final.kv_cells_used == 0 and final.live_branches == 0


def test_a_prompt_longer_than_one_batch_is_evaluated_in_chunks():
    """A 1,300-token prompt goes through three decode steps with n_batch 512, or one with n_batch 2048: the greedy
    continuation must be the same."""
    from ponder.engine import load_engine

    prompt = "Count the words in this list: " + " ".join(f"item{i}" for i in range(400)) + "\nAnswer:"

    async def continuation(engine):
        root = await engine.open(prompt)
        (b,) = await root.fork(1)
        root.release()
        await b.extend(SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
        b.release()
        return b.tokens, engine.stats()

    with load_engine("qwen2.5-0.5b", n_ctx=2048, n_seq_max=4, n_batch=512) as chunked:
        tokens_chunked, stats = run(continuation(chunked))
    with load_engine("qwen2.5-0.5b", n_ctx=2048, n_seq_max=4, n_batch=2048) as whole:
        tokens_whole, _ = run(continuation(whole))
    assert stats.prefill_tokens > 1024
    assert tokens_chunked == tokens_whole


def test_oversize_prompt_is_a_clear_error(real_engine):
    with pytest.raises(PromptTooLongError, match="context holds 4096"):
        run(real_engine.open("word " * 5000))


def test_too_many_tokens_requested_is_a_clear_error(real_engine):
    async def go():
        root = await real_engine.open(math_messages(QUESTION))
        try:
            await root.extend(SamplingParams(max_tokens=5000))
        finally:
            root.release()

    with pytest.raises(PromptTooLongError, match="lower max_tokens"):
        run(go())


def test_score_matches_the_logprobs_of_generation(real_engine):
    async def go():
        root = await real_engine.open(math_messages(QUESTION))
        (gen,) = await root.fork(1)
        await gen.extend(SamplingParams(temperature=0.0, max_tokens=12, logprobs=True, top_logprobs=5))
        scored = await root.score(gen.text)
        for b in (root, gen):
            b.release()
        return gen, scored

    gen, scored = run(go())
    assert len(gen.token_logprobs) == len(gen.confidences) == len(gen.entropies) == 12
    assert all(lp <= 0 for lp in gen.token_logprobs)
    assert all(c > 0 for c in gen.confidences)
    assert scored == pytest.approx(sum(gen.token_logprobs), abs=0.05)


def test_stop_strings_end_the_extend(real_engine):
    async def go():
        root = await real_engine.open(math_messages(QUESTION))
        (b,) = await root.fork(1)
        root.release()
        await b.extend(SamplingParams(temperature=0.0, max_tokens=200, stop=("\n",)))
        b.release()
        return b

    b = run(go())
    assert b.finish_reason == "stop" and b.matched_stop == "\n"
    # the stop string appears first in the last token (which may hold more, e.g. "\n\n"), and generation ended there
    last_piece = real_engine.token_text(b.tokens[-1])
    assert "\n" in last_piece and "\n" not in b.text[: len(b.text) - len(last_piece)]


def test_a_fork_at_a_step_boundary_shares_the_parents_cells(real_engine):
    async def go():
        usage = Usage()
        root = await real_engine.open(math_messages(QUESTION), usage)
        await root.extend(SamplingParams(temperature=0.0, max_tokens=24, stop=("\n\n",)))
        before = real_engine.stats().kv_cells_used
        children = await root.fork(3)
        await root.score(" ok")  # any step applies the queued copies
        after_fork = real_engine.stats().kv_cells_used
        await asyncio.gather(*(c.extend(SamplingParams(max_tokens=4, seed=i, ignore_eos=True))
                               for i, c in enumerate(children)))
        grown = real_engine.stats().kv_cells_used - before
        result = before, after_fork, usage.prompt_tokens_shared, root.n_past, grown
        for b in [root, *children]:
            b.release()
        return result

    before, after_fork, shared, parent_cells, grown = run(go())
    assert after_fork == before  # the children hold the parent's cells, no copy
    assert shared == 3 * parent_cells  # counted as reused, prompt and step alike
    assert grown == 3 * 4  # each child wrote only its own four tokens
    assert real_engine.stats().kv_cells_used == 0
