"""Tests for engine/speculative.py and engine/drafters.py on tiny random Llamas: greedy speculative output
equals the target alone (a different random draft, a perturbed copy, prompt lookup, int4 self-draft) across
stops and max_tokens; sampled tokens follow the target's processed distribution (chi-square); the cost model
pauses drafting when it does not pay; mismatched drafts are refused."""

from __future__ import annotations

import copy
import math
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import save_tiny_llama

from pocketllama.engine.drafters import ModelDrafter, PromptLookupDrafter, check_compatible, lookup
from pocketllama.engine.generate import generate, generate_step, stream_generate
from pocketllama.engine.sampling import SamplingParams, make_generator, make_logits_processors
from pocketllama.engine.speculative import (
    MAX_DRAFT,
    Distribution,
    _Controller,
    speculative_generate_step,
    verify,
)
from pocketllama.llm import load_model

PROMPT = [1, 17, 99, 203, 5, 64, 8, 41]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, above all on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """target; a different random draft (same vocab); a perturbed copy of the target (high acceptance)."""
    root = tmp_path_factory.mktemp("spec")
    kw = dict(tie_word_embeddings=False)  # untied: a random model does not just repeat its input
    save_tiny_llama(root / "target", seed=0, **kw)
    save_tiny_llama(root / "other", seed=1, num_hidden_layers=1, **kw)
    target, _ = load_model(root / "target")
    other, _ = load_model(root / "other")
    near = copy.deepcopy(target)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in near.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * p.std() * 0.15)
    return SimpleNamespace(target=target, other=other, near=near, root=root)


class IdTokenizer:
    """Every id is the text 't<id> '; ids 2 and 3 stop."""

    def __init__(self, vocab: int = 320) -> None:
        self.vocab_size, self.bos_id, self.eos_id, self.add_bos = vocab, 1, 2, True
        self.stop_ids = frozenset({2, 3})

    def encode(self, text: str, *, add_bos: bool = False, allow_special: bool = False) -> list[int]:
        return [1] * add_bos + [int(w[1:]) for w in text.split()]

    def decode(self, ids, *, skip_special: bool = False) -> str:
        return "".join(f"t{i} " for i in ids)

    def detokenizer(self):
        return SimpleNamespace(add=lambda i: f"t{i} ", flush=lambda: "")


def plain(model, prompt=PROMPT, n=40, **params) -> list[int]:
    processors = make_logits_processors(SamplingParams(**params), prompt) if params else ()
    return [t for t, _ in generate_step(model, prompt, max_tokens=n, logits_processors=processors)]


def speculative(model, drafter, prompt=PROMPT, n=40, k=4, adaptive=False, **params):
    sp = SamplingParams(**params)
    steps = speculative_generate_step(model, prompt, drafter, params=sp, max_tokens=n, num_draft=k,
                                      adaptive=adaptive, logits_processors=make_logits_processors(sp, prompt),
                                      generator=make_generator(sp.seed))
    return [t for t, _ in steps], steps.stats


# --- greedy: identical to the target alone -----------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, MAX_DRAFT])
def test_greedy_equals_target_alone_with_a_different_draft(models, k):
    expected = plain(models.target)
    got, stats = speculative(models.target, ModelDrafter(models.other), k=k)
    assert got == expected
    assert stats.drafted > stats.accepted  # the other model's drafts do get rejected


@pytest.mark.parametrize("adaptive", [False, True])
def test_greedy_equals_target_alone_with_a_close_draft(models, adaptive):
    expected = plain(models.target, n=48)
    got, stats = speculative(models.target, ModelDrafter(models.near), n=48, k=6, adaptive=adaptive)
    assert got == expected
    assert 0 < stats.accepted < stats.drafted  # both verdicts happen


def test_greedy_with_processors_equals_plain(models):
    """Penalties and bias fold in drafted ids on a fork; a rejection must not leave them counted."""
    params = dict(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.3, logit_bias={7: 2.0})
    expected = plain(models.target, **params)
    got, stats = speculative(models.target, ModelDrafter(models.near), k=4, **params)
    assert got == expected
    assert 0 < stats.accepted < stats.drafted


def test_logprobs_are_the_targets_raw_logprobs(models):
    ref = list(generate_step(models.target, PROMPT, max_tokens=12))
    steps = speculative_generate_step(models.target, PROMPT, ModelDrafter(models.near), max_tokens=12,
                                      adaptive=False, num_draft=4)
    for (t1, lp1), (t2, lp2) in zip(ref, steps, strict=True):
        assert t1 == t2
        torch.testing.assert_close(lp1, lp2, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("max_tokens", [1, 2, 5, 9, 23])
def test_max_tokens_is_exact(models, max_tokens):
    expected = plain(models.target, n=max_tokens)
    got, _ = speculative(models.target, ModelDrafter(models.near), n=max_tokens, k=6)
    assert got == expected and len(got) == max_tokens


def test_stop_ids_and_stop_strings_as_plain_decoding(models):
    tok = IdTokenizer()
    ref = plain(models.target, n=40)
    stop_id = ref[17]  # a token in the middle of a verification round
    stop_text = f"t{ref[9]} t{ref[10]}"
    for params in (dict(stop_token_ids=(stop_id,)), dict(stop=(stop_text,)), dict(max_tokens=13)):
        sp = SamplingParams(max_tokens=params.pop("max_tokens", 40), **params)
        a = list(stream_generate(models.target, tok, PROMPT, sp))
        b = list(stream_generate(models.target, tok, PROMPT, sp, drafter=ModelDrafter(models.near), num_draft=6))
        assert [(r.token, r.text, r.finish_reason) for r in a] == [(r.token, r.text, r.finish_reason) for r in b]
        assert b[-1].draft_tokens > 0 and b[-1].accepted_tokens <= b[-1].draft_tokens
    assert b[-1].finish_reason == "length" and len(b) == 13


def test_generate_result_reports_drafted_and_accepted(models):
    result = generate(models.target, IdTokenizer(), PROMPT, SamplingParams(max_tokens=30, ignore_eos=True),
                      drafter=ModelDrafter(models.near), num_draft=4)
    assert result.draft_tokens > 0 and 0 < result.accepted_tokens <= result.draft_tokens
    assert result.acceptance_rate == result.accepted_tokens / result.draft_tokens


def test_prompt_lookup_equals_target_alone_and_accepts_copies(models):
    prompt = PROMPT + [50, 60, 70, 80, 90, 100, 110, 120] * 3
    expected = plain(models.target, prompt=prompt)
    got, stats = speculative(models.target, PromptLookupDrafter(), prompt=prompt, k=5)
    assert got == expected
    assert stats.drafted > 0


def test_lookup_finds_the_latest_longest_match():
    seq = np.array([5, 6, 7, 8, 9, 5, 6, 7, 1, 2, 6, 7])
    assert lookup(seq, 3, 3, 1) == [1, 2, 6]  # "6 7" last seen before 1 2 (3-gram "2 6 7" never seen)
    assert lookup(seq, 2, 1, 1) == [1, 2]
    assert lookup(np.array([1, 2, 3]), 4, 3, 1) == []
    with pytest.raises(ValueError, match="1 <= min_ngram <= max_ngram"):
        PromptLookupDrafter(max_ngram=1, min_ngram=2)


@pytest.mark.parametrize("activations", ["exact", "int8"])
def test_int4_self_draft_equals_target_alone(models, activations):
    from pocketllama.quant import kernels
    from pocketllama.quant.handler import quantize_model
    from pocketllama.quant.modules import set_int8_activations

    draft = quantize_model(copy.deepcopy(models.target), "int4-g32")
    if activations == "int8":  # what load(draft="self-int4") uses where the CPU has the kernel
        if not kernels.has_int8_activations():
            pytest.skip("needs the AVX-512 VNNI kernel")
        set_int8_activations(draft)
    expected = plain(models.target, n=32)
    got, stats = speculative(models.target, ModelDrafter(draft, name="self-int4"), n=32, k=4)
    assert got == expected
    assert stats.accepted / stats.drafted > 0.5


def test_self_draft_takes_the_target_kv_instead_of_prefilling(models):
    """A self-draft adopts the target's K/V of committed ids: the draft model only ever sees one row at a time
    (no prompt prefill, no catch-up), and the output is still the target's own."""
    from pocketllama.quant.handler import quantize_model

    draft = quantize_model(copy.deepcopy(models.target), "int4-g32")
    rows = []
    draft.register_forward_pre_hook(lambda mod, args, kwargs: rows.append(args[0].shape[1]), with_kwargs=True)
    drafter = ModelDrafter(draft, name="self-int4", shares_kv=True)
    got, stats = speculative(models.target, drafter, n=32, k=4)
    assert got == plain(models.target, n=32)
    assert rows and max(rows) == 1 and stats.drafted > 0
    assert drafter.session.tokens[: len(PROMPT)] == PROMPT


def test_adopt_refuses_a_cache_of_another_shape(models):
    drafter = ModelDrafter(models.near, shares_kv=True)
    drafter.start(PROMPT, 64, [])
    other = models.target.make_cache(2, 64)  # two rows: not a single request's cache
    assert drafter.adopt(other, PROMPT + [5]) is False
    assert drafter.session.tokens == []


def test_draft_cache_is_reused_across_requests(models):
    drafter = ModelDrafter(models.near)
    speculative(models.target, drafter, n=8)
    first = drafter.session.tokens[: len(PROMPT)]
    assert first == PROMPT
    got, _ = speculative(models.target, drafter, prompt=PROMPT + [9, 10], n=8)
    assert drafter.catchup <= 3 and got == plain(models.target, prompt=PROMPT + [9, 10], n=8)


# --- sampling: the target's distribution -------------------------------------------------------------------

CHI2_P001 = {7: 24.32, 15: 37.70}  # chi-square critical values at p = 0.001


def chi_square(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pearson statistic over cells with expected count >= 5 (the rest pooled into one cell)."""
    n = counts.sum()
    expected = probs * n
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    return float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()), int(keep.sum()) - 1


def test_verify_draws_from_p_for_any_q():
    """The rejection rule alone, vectorised over synthetic p and q: the first emitted token ~ p[0]."""
    gen = torch.Generator().manual_seed(0)
    V, k, n = 8, 3, 4000
    p_logits = torch.randn(k + 1, V, generator=gen) * 1.5
    q = torch.softmax(torch.randn(k, V, generator=gen) * 1.5, dim=-1)
    dist = Distribution(SamplingParams(temperature=1.0), generator=gen)
    counts = np.zeros(V)
    for _ in range(n):
        drafted = dist.draw(q)
        j, nxt = verify(dist, drafted, p_logits, q)
        counts[int(drafted[0]) if j > 0 else int(nxt)] += 1
    stat, df = chi_square(counts, p_logits[0].softmax(-1).numpy())
    assert stat < CHI2_P001[df] if df in CHI2_P001 else stat < df + 6 * math.sqrt(2 * df)
    # a deterministic (one-hot) draft is exact too
    counts[:] = 0
    for i in range(n):
        drafted = torch.tensor([i % V, (i * 3) % V, 1])
        j, nxt = verify(dist, drafted, p_logits, None)
        counts[int(drafted[0]) if j > 0 else int(nxt)] += 1
    stat, df = chi_square(counts, p_logits[0].softmax(-1).numpy())
    assert stat < CHI2_P001[df]


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec8")
    save_tiny_llama(root / "t", seed=0, vocab_size=8, tie_word_embeddings=False)
    save_tiny_llama(root / "d", seed=1, vocab_size=8, num_hidden_layers=1, tie_word_embeddings=False)
    target, draft = load_model(root / "t")[0], load_model(root / "d")[0]
    with torch.no_grad():  # peaked, clearly different distributions: a wrong acceptance rule shows
        target.lm_head.weight.mul_(8.0)
        draft.lm_head.weight.mul_(8.0)
    return target, draft


def exact_marginals(model, prompt: list[int], params: SamplingParams, steps: int) -> list[np.ndarray]:
    """P(token i) for the first `steps` generated tokens, summing over every earlier branch (full forwards,
    processors rebuilt per branch, then the same temperature / top-k filter as plain sampling)."""
    dist = Distribution(params)
    V = model.config.vocab_size
    branches = [([], 1.0)]
    out = []
    for _ in range(steps):
        marginal, nxt = np.zeros(V), []
        seqs = torch.tensor([prompt + b for b, _ in branches])
        with torch.no_grad():
            logits = model(seqs)[:, -1].float()  # (branches, V)
        for (b, w), row in zip(branches, logits, strict=True):
            x = row[None]
            for proc in make_logits_processors(params, prompt):
                x = proc(torch.tensor([b], dtype=torch.long).view(1, -1), x)
            probs = dist.probs(x)[0].double().numpy()
            marginal += w * probs
            nxt += [(b + [t], w * probs[t]) for t in range(V) if probs[t] > 0]
        out.append(marginal)
        branches = nxt
    return out


@pytest.mark.parametrize("params", [dict(temperature=1.0), dict(temperature=0.7, top_k=6, repetition_penalty=1.5)])
def test_sampled_tokens_follow_the_target_distribution(small_vocab, params):
    target, draft = small_vocab
    prompt = [1, 5, 3, 7, 2]
    sp = SamplingParams(max_tokens=3, **params)
    exact = exact_marginals(target, prompt, sp, 3)
    drafter = ModelDrafter(draft)
    n = 700
    counts = np.zeros((3, 8))
    drafted = accepted = 0
    for seed in range(n):
        steps = speculative_generate_step(target, prompt, drafter, params=sp, generator=make_generator(seed),
                                          max_tokens=3, num_draft=2, adaptive=False,
                                          logits_processors=make_logits_processors(sp, prompt))
        for i, (tok, _) in enumerate(steps):
            counts[i, tok] += 1
        drafted, accepted = drafted + steps.stats.drafted, accepted + steps.stats.accepted
    assert 0 < accepted < drafted  # tokens 2 and 3 came from both accepted drafts and corrections
    for i in (1, 2):  # token 1 comes from the prompt's logits; 2 and 3 from a verification round
        stat, df = chi_square(counts[i], exact[i])
        assert stat < CHI2_P001[df], (i, stat, counts[i], exact[i] * n)


def test_seeded_sampling_is_reproducible(models):
    a, _ = speculative(models.target, ModelDrafter(models.near), n=20, temperature=0.8, seed=5)
    b, _ = speculative(models.target, ModelDrafter(models.near), n=20, temperature=0.8, seed=5)
    c, _ = speculative(models.target, ModelDrafter(models.near), n=20, temperature=0.8, seed=6)
    assert a == b and a != c


# --- the cost model ----------------------------------------------------------------------------------------


def test_controller_pauses_when_drafting_does_not_pay_and_probes_again():
    ctl = _Controller(k_max=8, adaptive=True)
    assert ctl.choose() == 0  # first two plain steps, to measure the yardstick
    ctl.record_plain(0.030)
    assert ctl.choose() == 0
    ctl.record_plain(0.010)
    k = ctl.choose()
    assert 1 <= k <= 8
    for _ in range(6):  # nothing accepted; drafting costs a third of a step per token
        ctl.record_round(k, 0, draft_seconds=0.0033 * k, verify_seconds=0.011)
    assert ctl.choose() == 0
    pause = ctl.pause + 1
    assert [ctl.choose() for _ in range(pause - 1)] == [0] * (pause - 1)
    assert ctl.choose() >= 1  # the probe after the pause
    ctl.record_round(1, 0, 0.0033, 0.011)
    ctl.record_round(1, 0, 0.0033, 0.011)
    assert ctl.choose() == 0 and ctl.pause >= 2 * pause - 2  # the next pause is longer


def test_a_slow_first_round_does_not_stop_drafting_for_good():
    """The probe after a pause replaces the draft's measured cost: one hiccup (a page fault, a neighbour's
    burst) must not keep a good draft paused for the rest of the request."""
    ctl = _Controller(k_max=8, adaptive=True)
    ctl.record_plain(0.010)
    ctl.record_plain(0.010)
    assert ctl.choose() == 1  # the first round is a probe of one draft
    ctl.record_round(1, 1, draft_seconds=0.050, verify_seconds=0.011)  # accepted, but 5 steps' cost
    assert ctl.choose() == 0 and ctl.pause > 0
    while ctl.pause:
        assert ctl.choose() == 0
    assert ctl.choose() == 1  # the probe after the pause
    ctl.record_round(1, 1, draft_seconds=0.002, verify_seconds=0.011)
    assert ctl.t_draft == pytest.approx(0.002) and ctl.choose() >= 2


def test_one_slow_verification_does_not_pause_a_paying_draft():
    """A neighbour's burst during one round (10x the verification time) must not flip the cost model."""
    ctl = _Controller(k_max=8, adaptive=True)
    ctl.record_plain(0.010)
    ctl.record_plain(0.010)
    assert ctl.choose() == 1
    for k in (1, 3, 4, 4):
        ctl.record_round(k, k, draft_seconds=0.002 * k, verify_seconds=0.010 + 0.0006 * k)
    assert ctl.choose() >= 2
    ctl.record_round(4, 4, draft_seconds=0.008, verify_seconds=0.130)
    assert ctl.choose() >= 2 and ctl.pause == 0


def test_controller_drafts_more_when_acceptance_is_high():
    ctl = _Controller(k_max=8, adaptive=True)
    ctl.record_plain(0.010)
    ctl.record_plain(0.010)
    ctl.choose()
    for k in (4, 6, 8, 5):
        ctl.record_round(k, k, draft_seconds=0.001 * k, verify_seconds=0.010 + 0.0005 * k)
    assert ctl.choose() >= 6
    fixed = _Controller(k_max=5, adaptive=False)
    assert fixed.choose() == 5


def test_fallback_keeps_output_and_mostly_decodes_plainly(models):
    """A slow draft that never agrees: the engine pauses drafting (plain steps dominate), output unchanged."""

    class Wrong(PromptLookupDrafter):
        def propose(self, seq, k, dist, generated, g):
            time.sleep(0.004)  # a draft model costs time; this one never agrees with the target
            ids = [(seq[-1] + 1 + i) % 320 for i in range(k)]
            generated[0, g:g + k] = torch.tensor(ids)
            return ids, None

    expected = plain(models.target, n=60)
    got, stats = speculative(models.target, Wrong(), n=60, k=4, adaptive=True)
    assert got == expected
    # a probe of one draft at the start and after each pause (16, then 32 tokens), then plain steps
    assert stats.plain_steps > 50 and stats.rounds <= 4 and stats.drafted == stats.rounds, stats


# --- errors --------------------------------------------------------------------------------------------------


def test_mismatched_vocabulary_is_refused(models, small_vocab):
    with pytest.raises(ValueError, match=r"draft model d8 has a vocabulary of 8 tokens but the target has 320"):
        check_compatible(models.target, small_vocab[1], "the target", "d8")


def test_mismatched_tokenizer_is_refused(models):
    class Tok(IdTokenizer):
        def __init__(self, table):
            super().__init__(320)
            self.table = table
            self.special_tokens = {}

        def token_bytes(self, i):
            return self.table.get(i, b"x%d" % i)

    a = SimpleNamespace(model=models.target, tokenizer=Tok({}))
    b = SimpleNamespace(model=models.other, tokenizer=Tok({17: b"zz"}))
    check_compatible(a, SimpleNamespace(model=models.other, tokenizer=Tok({})))
    with pytest.raises(ValueError, match=r"uses a different tokenizer than T \(token 17 is b'zz' vs b'x17'\)"):
        check_compatible(a, b, "T", "D")


def test_bad_arguments(models):
    with pytest.raises(ValueError, match=r"num_draft must be in \[1, 15\]"):
        speculative_generate_step(models.target, PROMPT, PromptLookupDrafter(), num_draft=16)
    with pytest.raises(ValueError, match="pass params .* instead of a sampler"):
        next(stream_generate(models.target, IdTokenizer(), PROMPT, SamplingParams(), sampler=lambda x: x,
                             drafter=PromptLookupDrafter()))
