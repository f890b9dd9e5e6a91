"""Tests for engine/sampling.py on crafted logits: exact filter supports, temperature, seeds, penalties,
logit bias, logprobs, and SamplingParams defaults/validation."""

from __future__ import annotations

import math

import pytest
import torch

from pocketllama.engine.sampling import (
    LogitBias,
    PresenceFrequencyPenalty,
    RepetitionPenalty,
    SamplingParams,
    apply_min_p,
    apply_top_k,
    apply_top_p,
    make_logits_processors,
    make_sampler,
    token_logprobs,
    top_logprobs,
)

LLAMA_32_INSTRUCT_GEN = {"bos_token_id": 128000, "do_sample": True, "eos_token_id": [128001, 128008, 128009],
                         "temperature": 0.6, "top_p": 0.9}


def logits_from_probs(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32).log()  # [B, V]


def support(sampler, logits: torch.Tensor, n: int = 3000) -> list[set[int]]:
    """The set of ids each row produced over n draws (one batched call: rows repeated n times)."""
    B = logits.shape[0]
    draws = sampler(logits.repeat(n, 1)).view(n, B)  # (n, B)
    return [set(draws[:, b].tolist()) for b in range(B)]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- filters: exact support, checked directly and by sampling --------------------------------------------


def test_top_p_keeps_exactly_the_nucleus_and_renormalizes():
    logits = logits_from_probs([0.05, 0.5, 0.1, 0.2, 0.15])
    # sorted: 0.5, 0.2, 0.15, 0.1, 0.05; mass before each: 0, .5, .7, .85, .95 -> p=0.75 keeps the first three
    filtered = apply_top_p(logits, 0.75)
    probs = filtered.softmax(-1)[0]
    expected = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.15]) / 0.85
    torch.testing.assert_close(probs, expected)
    assert support(make_sampler(1.0, top_p=0.75, generator=gen()), logits) == [{1, 3, 4}]


def test_top_p_always_keeps_the_top_token():
    logits = logits_from_probs([0.3, 0.4, 0.3])
    assert torch.isfinite(apply_top_p(logits, 1e-6)).tolist() == [[False, True, False]]
    assert support(make_sampler(1.0, top_p=1e-6, generator=gen()), logits, 300) == [{1}]


def test_top_k_keeps_exactly_k_per_row():
    logits = torch.tensor([[0.1, 3.0, 2.0, -1.0, 1.0], [5.0, 4.0, 3.0, 2.0, 1.0]])
    assert torch.isfinite(apply_top_k(logits, 2)).tolist() == [[False, True, True, False, False],
                                                               [True, True, False, False, False]]
    assert torch.equal(apply_top_k(logits, 99), logits)  # k past the vocabulary keeps everything
    assert support(make_sampler(1.0, top_k=2, generator=gen()), logits) == [{1, 2}, {0, 1}]


def test_min_p_keeps_tokens_at_least_min_p_times_the_top():
    logits = logits_from_probs([0.4, 0.3, 0.19, 0.11])  # threshold 0.5 * 0.4 = 0.2
    assert torch.isfinite(apply_min_p(logits, 0.5)).tolist() == [[True, True, False, False]]
    torch.testing.assert_close(apply_min_p(logits, 0.5).softmax(-1)[0], torch.tensor([4 / 7, 3 / 7, 0, 0]))
    assert support(make_sampler(1.0, min_p=0.5, generator=gen()), logits) == [{0, 1}]


def test_filters_apply_in_order_top_k_then_top_p_on_the_renormalized_distribution():
    logits = logits_from_probs([0.4, 0.3, 0.2, 0.1])
    # top-p alone at 0.5 keeps {0, 1}; after top-k=2 the probs are 4/7, 3/7 and top-p 0.5 keeps only {0}
    assert support(make_sampler(1.0, top_p=0.5, generator=gen()), logits, 500) == [{0, 1}]
    assert support(make_sampler(1.0, top_k=2, top_p=0.5, generator=gen()), logits, 500) == [{0}]


def test_temperature_scales_logits_before_sampling():
    logits = torch.tensor([[1.0, 0.0, -1.0]])
    n = 20000
    for t in (0.5, 2.0):
        draws = torch.stack([make_sampler(t, generator=gen(1))(logits.expand(n, 3))])[0]  # one batched draw
        freq = torch.bincount(draws, minlength=3).float() / n
        torch.testing.assert_close(freq, (logits[0] / t).softmax(-1), atol=0.015, rtol=0)


def test_greedy_is_argmax_per_row_and_ignores_filters():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, -1.0, 2.9]])
    assert make_sampler(0.0, top_p=0.1, top_k=1, min_p=0.9)(logits).tolist() == [1, 0]


def test_seeded_sampler_is_reproducible():
    logits = torch.randn(2, 50, generator=gen(7))

    def draws(seed: int) -> list[list[int]]:
        sampler = make_sampler(0.8, top_p=0.95, top_k=40, generator=gen(seed))
        return [sampler(logits).tolist() for _ in range(30)]

    assert draws(123) == draws(123)
    assert draws(123) != draws(124)


def test_sampler_never_draws_a_removed_token_from_a_wide_vocabulary():
    logits = torch.zeros(16, 128256)
    logits[:, :3] = 10.0  # everything else is removed by top_k=3
    drawn = make_sampler(1.0, top_k=3, generator=gen())(logits)
    assert set(drawn.tolist()) <= {0, 1, 2}


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -0.1}, "temperature must be >= 0"),
    ({"top_p": 0.0}, "top_p must be in (0, 1]"),
    ({"top_p": 1.5}, "top_p must be in (0, 1]"),
    ({"top_k": -3}, "top_k must be an int >= 0"),
    ({"min_p": 1.5}, "min_p must be in [0, 1]"),
])
def test_make_sampler_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        make_sampler(**{"temperature": 1.0, **kwargs})


# --- processors -------------------------------------------------------------------------------------------


def test_repetition_penalty_hf_semantics_over_prompt_and_generated():
    proc = RepetitionPenalty(2.0, torch.tensor([[0, 1, 1]]))
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.5]])
    out = proc(torch.tensor([[2]]), logits)
    torch.testing.assert_close(out, torch.tensor([[1.0, -4.0, 0.5, -1.0, 0.5]]))  # seen: 0, 1 (prompt), 2


def test_presence_and_frequency_penalties_openai_semantics_over_generated_only():
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    (proc,) = make_logits_processors(params, [3, 3, 3])  # the prompt does not count
    logits = torch.zeros(1, 5)
    out = proc(torch.tensor([[0, 0, 1]]), logits)
    torch.testing.assert_close(out, torch.tensor([[-1.0, -0.75, 0.0, 0.0, 0.0]]))


def test_penalty_counts_are_incremental_and_match_a_recount():
    proc = PresenceFrequencyPenalty(0.0, 1.0)
    buffer = torch.tensor([[4, 1, 4, 4, 2, 1]])
    logits = torch.zeros(1, 6)
    for n in range(buffer.shape[1] + 1):  # the engine passes a growing view of one buffer
        out = proc(buffer[:, :n], logits)
        recount = torch.bincount(buffer[0, :n], minlength=6).float()
        torch.testing.assert_close(out[0], -recount)


def test_processors_are_batch_shaped_and_ignore_prompt_padding():
    proc = RepetitionPenalty(2.0, torch.tensor([[1, -1, -1], [0, 2, 2]]))  # -1 = right padding
    logits = torch.full((2, 3), 4.0)
    out = proc(torch.zeros(2, 0, dtype=torch.long), logits)
    torch.testing.assert_close(out, torch.tensor([[4.0, 2.0, 4.0], [2.0, 4.0, 2.0]]))


def test_logit_bias_adds_and_rejects_ids_outside_the_vocabulary():
    out = LogitBias({1: 5.0, 3: -100.0})(torch.zeros(1, 0), torch.zeros(2, 4))
    torch.testing.assert_close(out, torch.tensor([[0.0, 5.0, 0.0, -100.0]] * 2))
    with pytest.raises(ValueError, match=r"logit_bias token id\(s\) \[7\] are outside the vocabulary \(size 4\)"):
        LogitBias({7: 1.0})(torch.zeros(1, 0), torch.zeros(1, 4))


def test_make_logits_processors_order_and_empty_default():
    assert make_logits_processors(SamplingParams(), [1, 2]) == []
    procs = make_logits_processors(SamplingParams(repetition_penalty=1.1, frequency_penalty=0.1,
                                                  logit_bias={0: 1.0}), [1, 2])
    assert [type(p) for p in procs] == [RepetitionPenalty, PresenceFrequencyPenalty, LogitBias]


# --- logprobs ---------------------------------------------------------------------------------------------


def test_logprobs_are_the_raw_log_softmax_with_sorted_alternatives():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    lp = token_logprobs(logits)
    torch.testing.assert_close(lp.exp().sum(), torch.tensor(1.0))
    top = top_logprobs(lp[0], 2)
    assert [t for t, _ in top] == [1, 2]
    assert top[0][1] == pytest.approx(3.0 - math.log(sum(math.exp(x) for x in (1, 3, 2, 0))), abs=1e-6)
    assert top_logprobs(lp[0], 0) == []


# --- SamplingParams ---------------------------------------------------------------------------------------


def test_params_from_llama_instruct_generation_config():
    p = SamplingParams.from_generation_config(LLAMA_32_INSTRUCT_GEN)
    assert (p.temperature, p.top_p, p.top_k, p.min_p) == (0.6, 0.9, 0, 0.0)
    assert not p.greedy


def test_params_without_do_sample_are_greedy_and_overrides_win():
    assert SamplingParams.from_generation_config({}).greedy
    assert SamplingParams.from_generation_config(None).greedy
    assert SamplingParams.from_generation_config({"do_sample": False, "temperature": 0.6}).greedy
    p = SamplingParams.from_generation_config(LLAMA_32_INSTRUCT_GEN, temperature=0.0, top_p=None, seed=3,
                                              max_tokens=10)
    assert (p.temperature, p.top_p, p.seed, p.max_tokens) == (0.0, 0.9, 3, 10)
    with pytest.raises(TypeError, match=r"unknown sampling parameter\(s\) \['topp'\]"):
        SamplingParams.from_generation_config({}, topp=0.5)


def test_params_normalize_containers_and_stay_hashable():
    p = SamplingParams(stop="</s>", stop_token_ids=[5], logit_bias={"3": "1.5"}, top_k=-1)
    assert (p.stop, p.stop_token_ids, p.logit_bias, p.top_k) == (("</s>",), (5,), {3: 1.5}, 0)
    hash(p)
    assert p.replace(temperature=1.0).temperature == 1.0


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -1.0}, "temperature must be >= 0"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_k": 2.5}, "top_k must be an int >= 0"),
    ({"min_p": -0.1}, r"min_p must be in \[0, 1\]"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
    ({"presence_penalty": 3.0}, r"presence_penalty must be in \[-2, 2\]"),
    ({"frequency_penalty": -2.5}, r"frequency_penalty must be in \[-2, 2\]"),
    ({"logit_bias": {-1: 1.0}}, "logit_bias entry -1"),
    ({"seed": "x"}, "seed must be an int or None"),
    ({"max_tokens": 0}, "max_tokens must be >= 1"),
    ({"stop": ["ok", ""]}, "stop must hold non-empty strings"),
    ({"stop_token_ids": [-2]}, "stop_token_ids must be token ids >= 0"),
    ({"top_logprobs": -1}, "top_logprobs must be >= 0"),
    ({"top_logprobs": 3}, "top_logprobs=3 needs logprobs=True"),
])
def test_params_validation_names_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)
