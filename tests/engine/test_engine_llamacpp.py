"""The real batched engine on the bundled 0.5B: short generations, a few seconds each."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import llama_cpp
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
    # the last prompt token is decoded with the first step; what the prefix cache held is not evaluated again
    assert prefill_tokens == usage.prompt_tokens - 1 - usage.prompt_tokens_cached
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
    from ponder.engine import PonderError
    from ponder.models import load_engine

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
    from ponder.models import load_engine

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
    # Equal up to llama.cpp's batch-shape numerics (the prompt's cells may come from the prefix cache, computed in
    # another batch): ~0.005 nats per token was seen, so 0.1 over 12 tokens.
    assert scored == pytest.approx(sum(gen.token_logprobs), abs=0.1)


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


# ---- the prefix cache across requests ----------------------------------------------------------------------------

FEW_SHOT = """Answer with the number only. Examples:
Q: A farmer has 3 fields with 14 cows each. He sells 9 cows. How many cows are left? A: 33
Q: Tom reads 12 pages a day for 5 days, then 7 pages a day for 3 days. How many pages did he read? A: 81
Q: A box holds 24 pencils. A school buys 15 boxes and hands out 290 pencils. How many are left? A: 70
Q: Sara saves $8 a week for 13 weeks and spends $45 on a gift. How much money does she have? A: 59
Q: A train travels 65 miles an hour for 4 hours and then 50 miles an hour for 2 hours. How far did it go? A: 360
Q: There are 7 shelves with 32 books each. 18 books are borrowed. How many books are on the shelves? A: 206"""
OTHER_SYSTEM = "You are a careful assistant. Think about units, then answer in one short sentence. " * 10
QUESTIONS = ["What is 12 times 7?", "What is 15 plus 27?", "What is 9 squared?"]
SHORT = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def chat(question: str, system: str = FEW_SHOT):
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


async def request(engine, messages, forks: int = 0, params: SamplingParams = SHORT):
    """One request's greedy tokens and usage: the root extends, or ``forks`` children do while the root is released
    (its prompt goes to the cache while they still use its cells)."""
    usage = Usage()
    root = await engine.open(messages, usage)
    if not forks:
        await root.extend(params)
        root.release()
        return [root.tokens], usage
    children = await root.fork(forks)
    root.release()
    await asyncio.gather(*(c.extend(params) for c in children))
    for c in children:
        c.release()
    return [c.tokens for c in children], usage


def prompt_tokens(engine, messages) -> list[int]:
    return engine.tokenize(engine.format_chat(messages), add_bos=False)


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def assert_at_rest(engine, model=None):
    """Nothing stays in the context: no live branch, no cell, every sequence id free, in the engine's accounting and
    in llama.cpp's own KV cache; the prefix cache holds its prompts' KV outside it, copied out of the model's context
    (and the draft's)."""
    runner = engine._runners[model or engine.model.name]
    assert engine.stats().kv_cells_used == 0 and engine.stats().live_branches == 0
    for r in filter(None, (runner, runner.draft)):
        # the engine is idle: apply the queued copies and removals as its next step would
        r.context.apply_kv_ops(r.kv_ops)
        r.kv_ops = []
        assert r.cells_used == 0 and len(r._free_seqs) == r.n_seq_max
        assert all(llama_cpp.llama_memory_seq_pos_max(r.context._memory, s) == -1 for s in range(r.n_seq_max))
    for entry in runner.prefix_cache._entries if runner.prefix_cache else []:
        assert entry.states[0] is not None and (entry.states[1] is not None) == (runner.draft is not None)


def test_prefix_cache_gives_the_same_greedy_tokens_and_counts_what_it_reused():
    from ponder.models import load_engine

    requests = [(QUESTIONS[0], 0), (QUESTIONS[1], 0), (QUESTIONS[0], 0), (QUESTIONS[2], 2), (QUESTIONS[2], 0)]

    async def serve(engine):
        return [await request(engine, chat(q), forks) for q, forks in requests]

    with load_engine("qwen2.5-0.5b", n_ctx=2048, n_seq_max=8, prefix_cache_tokens=0) as plain:
        expected = run(serve(plain))
        assert_at_rest(plain)
    with load_engine("qwen2.5-0.5b", n_ctx=2048, n_seq_max=8) as cached:
        got = run(serve(cached))
        prompts = [prompt_tokens(cached, chat(q)) for q in QUESTIONS]
        evaluated = cached.stats().prefill_tokens
        assert_at_rest(cached)
    assert [tokens for tokens, _ in got] == [tokens for tokens, _ in expected]
    assert all(usage.prompt_tokens_cached == 0 for _, usage in expected)
    shared = common_prefix(prompts[0], prompts[1])  # the system prompt and the question's first tokens
    assert shared > 150
    cached_tokens = [usage.prompt_tokens_cached for _, usage in got]
    assert cached_tokens == [0, shared, len(prompts[0]) - 1,
                             max(common_prefix(prompts[2], p) for p in prompts[:2]), len(prompts[2]) - 1]
    assert [usage.models["qwen2.5-0.5b"].get("prompt_tokens_cached", 0) for _, usage in got] == cached_tokens
    assert evaluated == sum(usage.prompt_tokens - 1 - usage.prompt_tokens_cached for _, usage in got)


def test_a_small_context_few_ids_and_a_small_budget_keep_outputs_right():
    """Four sequence ids, 512 cells and a budget of about two prompts: a fork takes every id, the budget evicts, an
    extend takes most of the context; nothing waits and the outputs are those of an engine without a cache."""
    from ponder.engine import PonderError
    from ponder.models import load_engine

    async def serve(engine, long_tokens: int):
        out = [await request(engine, chat(QUESTIONS[0]))]
        out.append(await request(engine, chat(QUESTIONS[1])))  # shares the system prompt: both stay cached
        both = engine.prefix_cache_tokens()
        out.append(await request(engine, chat(QUESTIONS[2]), forks=3))  # 1 + 3 ids: every id of the engine
        out.append(await request(engine, chat(QUESTIONS[0], OTHER_SYSTEM)))  # over the budget: the oldest go
        after_budget = engine.prefix_cache_tokens()
        out.append(await request(engine, chat(QUESTIONS[1]), params=replace(SHORT, max_tokens=long_tokens)))
        return out, both, after_budget

    n_ctx = 512
    with load_engine("qwen2.5-0.5b", n_ctx=2048, n_seq_max=8, prefix_cache_tokens=0) as plain:
        first_two = [len(prompt_tokens(plain, chat(q))) for q in QUESTIONS[:2]]
        budget = sum(first_two)
        long_tokens = n_ctx - first_two[1] - 16
        expected, _, _ = run(serve(plain, long_tokens))
    with load_engine("qwen2.5-0.5b", n_ctx=n_ctx, n_seq_max=4, prefix_cache_tokens=budget,
                     stall_timeout_s=5.0) as small:
        assert small.n_ctx == n_ctx
        try:
            got, both, after_budget = run(serve(small, long_tokens))
        except PonderError as exc:
            pytest.fail(f"a job waited: {exc}")
        assert both == sum(n - 1 for n in first_two)  # each cached prompt keeps its own copy
        assert after_budget <= budget
        assert_at_rest(small)
    assert [tokens for tokens, _ in got] == [tokens for tokens, _ in expected]
    assert got[1][1].prompt_tokens_cached > 150 and got[2][1].prompt_tokens_cached > 150


def test_a_cached_prompt_loads_into_a_fragmented_cache():
    """A hit copies the cached prompt's KV into cells that are free but scattered: six short requests fill the
    context, every other one is released, and no run of free cells is as long as the cached prompt. (llama.cpp once
    restored a sequence into contiguous cells only, its issue 17527.)"""
    from ponder.models import load_engine

    async def serve(engine):
        await request(engine, chat(QUESTIONS[0]))
        roots = []
        for i in range(6):
            root = await engine.open([{"role": "user", "content": f"item{i} " * 8}], Usage())
            await root.extend(SHORT)
            roots.append(root)
        for root in roots[::2]:
            root.release()
        answer = await request(engine, chat(QUESTIONS[1]))
        for root in roots[1::2]:
            root.release()
        return roots[0].n_past, answer

    with load_engine("qwen2.5-0.5b", n_ctx=512, n_seq_max=8, prefix_cache_tokens=0) as plain:
        _, (expected, _) = run(serve(plain))
    with load_engine("qwen2.5-0.5b", n_ctx=512, n_seq_max=8) as cached:
        short, (got, usage) = run(serve(cached))
        assert_at_rest(cached)
    assert 512 - 6 * short < usage.prompt_tokens_cached and short < usage.prompt_tokens_cached  # no run that long
    assert got == expected


def test_prefix_cache_under_speculative_decoding(tmp_path):
    """The draft's shadows reuse the same prefix: a cached prompt keeps a copy of the shadow's KV too.
    (The bundled 0.5B drafts for a copy of itself under another name: cheap, and greedy output is the target's.)"""
    from ponder.models import load_engine
    from ponder.models import resolve_model

    draft = tmp_path / "draft-copy.gguf"
    draft.symlink_to(resolve_model("qwen2.5-0.5b").path)
    requests = [(QUESTIONS[0], 0), (QUESTIONS[1], 2), (QUESTIONS[0], 0)]

    async def serve(engine):
        return [await request(engine, chat(q), forks) for q, forks in requests]

    with load_engine("qwen2.5-0.5b", n_ctx=2048, n_seq_max=8, prefix_cache_tokens=0) as plain:
        expected = run(serve(plain))
    with load_engine("qwen2.5-0.5b", draft=str(draft), n_ctx=2048, n_seq_max=8) as speculative:
        got = run(serve(speculative))
        assert len(speculative._default.prefix_cache) == 2
        assert_at_rest(speculative)  # the draft's context is empty too; each cached prompt has both copies
    assert [tokens for tokens, _ in got] == [tokens for tokens, _ in expected]
    for _, usage in got[1:]:
        assert usage.drafted_tokens > 0
        assert usage.models["draft-copy"]["prompt_tokens_cached"] == usage.models["qwen2.5-0.5b"][
            "prompt_tokens_cached"] > 0
