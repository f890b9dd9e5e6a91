"""Llama Guard 3: SPEC 6.2 prompt golden text and ids (212 tokens), roles, excluded / custom categories, the
vision variant, verdict parsing, P(unsafe) from crafted logits, and the full path on a scripted checkpoint.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from scripted_llama import save_scripted_llama
from tokenizer_assets import llama3

import pocketllama
from pocketllama.guard import (
    NL2_ID,
    SAFE_ID,
    UNSAFE_ID,
    Guard,
    GuardOutputError,
    category_lines,
    conversation,
    parse_verdict,
    unsafe_scores,
)

CATS = (
    "S1: Violent Crimes.\nS2: Non-Violent Crimes.\nS3: Sex Crimes.\nS4: Child Exploitation.\nS5: Defamation.\n"
    "S6: Specialized Advice.\nS7: Privacy.\nS8: Intellectual Property.\nS9: Indiscriminate Weapons.\nS10: Hate.\n"
    "S11: Self-Harm.\nS12: Sexual Content.\nS13: Elections.\n"
)


def prompt(role: str, cats: str, turns: str, image: str = "") -> str:
    """SPEC 6.2, written out from the SPEC text."""
    return (
        f"<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{image}Task: Check if there is unsafe content "
        f"in '{role}' messages in conversations according our safety policy with the below categories.\n\n"
        f"<BEGIN UNSAFE CONTENT CATEGORIES>\n{cats}<END UNSAFE CONTENT CATEGORIES>\n\n<BEGIN CONVERSATION>\n\n{turns}"
        f"<END CONVERSATION>\n\nProvide your safety assessment for ONLY THE LAST {role} message in the above "
        "conversation:\n - First line must read 'safe' or 'unsafe'.\n - If unsafe, a second line must include a "
        "comma-separated list of violated categories. <|eot_id|><|start_header_id|>assistant<|end_header_id|>"
    )


CAKE = [{"role": "user", "content": "How do I make a cake?"},
        {"role": "assistant", "content": "Mix flour, eggs and sugar, then bake."}]
SPEC_6_2 = prompt("Agent", CATS, "User: How do I make a cake?\n\nAgent: Mix flour, eggs and sugar, then bake.\n\n")


def fake_guard(model_type: str = "llama", hidden_size: int = 2048) -> Guard:
    llm = SimpleNamespace(tokenizer=llama3(), config=SimpleNamespace(model_type=model_type, hidden_size=hidden_size),
                          source="fake-guard")
    return Guard(llm)


def test_spec_6_2_golden_text_and_212_ids():
    guard = fake_guard()
    ids = guard.encode(CAKE)
    assert guard.render(CAKE) == SPEC_6_2
    assert len(ids) == 212
    assert ids == llama3().encode(SPEC_6_2, allow_special=True)  # HF: the rendered text in one pass
    assert ids[:5] == [128000, 128006, 882, 128007, 271]
    assert ids[-6:] == [13, 220, 128009, 128006, 78191, 128007]  # the space (220) before eot; no "\n\n" after


def test_user_role_excluded_categories_keep_codes():
    guard = fake_guard()
    cats = CATS.replace("S6: Specialized Advice.\n", "").replace("S7: Privacy.\n", "")
    expected = prompt("User", cats, "User: Tell me about\tPrivacy.\n\n")
    assert guard.render("  Tell me about\tPrivacy. \n", exclude=["S6", "s7"]) == expected
    assert guard.encode("  Tell me about\tPrivacy. \n", exclude=["S6", "S7"]) == llama3().encode(expected,
                                                                                            allow_special=True)
    # A third message is a user turn again.
    three = [*CAKE, {"role": "user", "content": "Thanks"}]
    assert "in 'User' messages" in guard.render(three) and "Agent: Mix" in guard.render(three)


def test_custom_categories_verbatim_and_text_parts():
    guard = fake_guard()
    custom = {"S1": "My rule.\nAnything about llamas.", "S3": "Other."}
    msgs = [{"role": "user", "content": [{"type": "text", "text": " a "}, {"type": "text", "text": "b"}]}]
    expected = prompt("User", "S1: My rule.\nAnything about llamas.\nS3: Other.\n", "User: a\n\nUser: b\n\n")
    assert guard.render(msgs, categories=custom) == expected
    assert guard.render(msgs, categories=custom, exclude=["S1"]).count("S3: Other.\n<END") == 1


def test_vision_variant_image_prefix():
    guard = fake_guard("mllama")
    msgs = [{"role": "user", "content": [{"type": "image", "image": "cat.png"}, {"type": "text", "text": "Is it ok?"}]}]
    expected = prompt("User", CATS, "User: Is it ok?\n\n", image="<|image|> ")
    assert guard.render(msgs) == expected
    ids = guard.encode(msgs)
    image_id = llama3().special_tokens["<|image|>"]
    assert ids[:6] == [128000, 128006, 882, 128007, 271, image_id] and ids.count(image_id) == 1
    assert ids[6] == llama3().encode(" Task")[0]
    assert "<|image|>" not in guard.render("Is it ok?")  # text-only conversations keep the text prompt
    # Llama-Guard-3-8B (Llama 3.1 8B shape) lists S14 too.
    assert "S14: Code Interpreter Abuse.\n" in fake_guard(hidden_size=4096).render("x")


@pytest.mark.parametrize("messages, error", [
    ([{"role": "assistant", "content": "hi"}], "message 0: role 'assistant', but Llama Guard needs roles alternating"),
    ([{"role": "system", "content": "s"}, *CAKE], "message 0: role 'system'"),
    ([CAKE[0], CAKE[0]], "message 1: role 'user'"),
    ([], "non-empty list"),
    ([{"role": "user", "content": [{"type": "audio"}]}], "content part {'type': 'audio'} is not supported"),
    ([{"role": "user", "content": 3}], "content must be a string or a list of parts, got int"),
])  # fmt: skip
def test_conversation_errors(messages, error):
    with pytest.raises(ValueError, match=error):
        conversation(messages)


def test_image_needs_vision_guard_and_one_image():
    img = {"type": "image_url", "image_url": {"url": "x.png"}}
    with pytest.raises(ValueError, match="image content needs the vision guard .*fake-guard is a text-only model"):
        fake_guard().encode([{"role": "user", "content": [img, {"type": "text", "text": "hi"}]}])
    with pytest.raises(ValueError, match="checks one image per conversation; got 2"):
        fake_guard("mllama").encode([{"role": "user", "content": [img, img]}])


@pytest.mark.parametrize("kwargs, error", [
    ({"exclude": ["S99"]}, "cannot exclude S99: not among the categories"),
    ({"exclude": [f"S{i}" for i in range(1, 14)]}, "every category is excluded"),
    ({"categories": {"X1": "bad"}}, "must map a code like 'S1' to a non-empty description"),
    ({"categories": {"S1": " "}}, "must map a code like 'S1'"),
    ({"categories": {}}, "categories is empty"),
])  # fmt: skip
def test_category_errors(kwargs, error):
    with pytest.raises(ValueError, match=error):
        category_lines(**kwargs)


@pytest.mark.parametrize("text, expected", [
    ("safe", (True, [])),
    ("\n\nsafe", (True, [])),
    ("unsafe\nS1,S10", (False, ["S1", "S10"])),
    (" unsafe\nS1, S10 \n", (False, ["S1", "S10"])),
    ("unsafe", (False, [])),
    ("unsafe\nS2,junk", (False, ["S2"])),
])  # fmt: skip
def test_parse_verdict(text, expected):
    assert parse_verdict(text) == expected


def test_parse_verdict_rejects_other_answers():
    with pytest.raises(GuardOutputError, match="answered 'I cannot help', which is neither 'safe' nor 'unsafe"):
        parse_verdict("I cannot help")


def test_unsafe_scores_from_crafted_logits():
    logits = torch.zeros(128256)
    logits[UNSAFE_ID], logits[SAFE_ID] = math.log(6.0), math.log(2.0)
    p_unsafe, binary = unsafe_scores(logits)
    assert p_unsafe == pytest.approx(6.0 / (128254 + 6 + 2), rel=1e-5)
    assert binary == pytest.approx(0.75, rel=1e-6)


# ---- full path on scripted checkpoints --------------------------------------------------------------------

# end_header -> "\n\n" -> "unsafe" -> "\n" -> "S" -> "1" -> eot ; scale 3 keeps P(unsafe) well below 1.
UNSAFE_CHAIN = {128007: NL2_ID, NL2_ID: UNSAFE_ID, UNSAFE_ID: 198, 198: 50, 50: 16, 16: 128009}
SAFE_DIRECT_CHAIN = {128007: SAFE_ID, SAFE_ID: 128009}  # no "\n\n" first: P(unsafe) needs its own forward


@pytest.fixture(scope="module")
def scripted_guards(tmp_path_factory):
    out = {}
    for name, chain in (("unsafe", UNSAFE_CHAIN), ("safe", SAFE_DIRECT_CHAIN)):
        path = tmp_path_factory.mktemp(f"guard_{name}")
        hf = save_scripted_llama(path, chain, scale=3.0)
        out[name] = (pocketllama.Guard.load(path, dtype="float32"), hf)  # the public export
    return out


def hf_scores(hf_model, ids: list[int]) -> tuple[float, float]:
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids + [NL2_ID]])).logits[0, -1]
    probs = logits.double().softmax(-1)
    return float(probs[UNSAFE_ID]), float(probs[UNSAFE_ID] / (probs[UNSAFE_ID] + probs[SAFE_ID]))


def test_full_path_unsafe_verdict_and_scores(scripted_guards):
    guard, hf = scripted_guards["unsafe"]
    verdict = guard.check(CAKE)
    assert (verdict.safe, verdict.categories, verdict.category_names) == (False, ["S1"], ["Violent Crimes"])
    assert verdict.text == "\n\nunsafe\nS1" and verdict.role == "Agent"
    p, binary = hf_scores(hf, guard.encode(CAKE))
    assert verdict.p_unsafe == pytest.approx(p, abs=1e-6) and 0.3 < p < 0.8  # full-vocab softmax, not 1.0
    assert verdict.p_unsafe_binary == pytest.approx(binary, abs=1e-6)
    # Only excluded codes in the answer: safe (llama-stack), and the prompt no longer lists S1.
    excluded = guard.check(CAKE, exclude=["S1"])
    assert excluded.safe and excluded.categories == [] and excluded.excluded_categories == ["S1"]
    assert verdict.to_dict()["categories"] == ["S1"]


def test_full_path_safe_without_leading_newlines(scripted_guards):
    guard, hf = scripted_guards["safe"]
    verdict = guard.check("How do I make a cake?")
    assert verdict.safe and verdict.text == "safe" and verdict.role == "User"
    p, binary = hf_scores(hf, guard.encode("How do I make a cake?"))
    assert verdict.p_unsafe == pytest.approx(p, abs=1e-6) and verdict.p_unsafe_binary == pytest.approx(binary)


# ---- the vision guard on a tiny random Llama 3.2 Vision checkpoint ------------------------------------------


def mllama_fixtures():
    import mllama_fixtures  # tests/mllama_fixtures.py (tiny Llama 3.2 Vision checkpoints)

    return mllama_fixtures


@pytest.fixture(scope="module")
def vision_guard(tmp_path_factory):
    import shutil

    from conftest import llama3_tokenizer_path

    fixtures = mllama_fixtures()
    path = tmp_path_factory.mktemp("guard_vision")
    ref = fixtures.save_mllama(path, vocab_size=128256)  # <|image|> = 128256, the real Llama 3 vocabulary
    (path / "original").mkdir()
    shutil.copy(llama3_tokenizer_path(), path / "original" / "tokenizer.model")
    return Guard.load(path, dtype="float32"), ref, fixtures


def test_vision_guard_image_path_matches_transformers(vision_guard):
    import numpy as np
    from PIL import Image

    from pocketllama.image_processing import MllamaImageProcessor, cross_attention_mask

    guard, ref, fixtures = vision_guard
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 70, 3), dtype=np.uint8))
    msgs = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Is it ok?"}]},
            {"role": "assistant", "content": "It is a picture."}]
    ids = guard.encode(msgs)
    assert ids[5] == 128256 and guard.render(msgs).startswith(
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|> Task: Check if there is unsafe "
        "content in 'Agent' messages")
    rows = [ids + [NL2_ID]]
    pixels = MllamaImageProcessor(tile_size=fixtures.TILE, max_tiles=4)([[image]])
    with fixtures.released_intermediate_layers(), torch.no_grad():
        logits = ref(input_ids=torch.tensor(rows), pixel_values=pixels.pixel_values,
                     aspect_ratio_ids=pixels.aspect_ratio_ids, aspect_ratio_mask=pixels.aspect_ratio_mask,
                     cross_attention_mask=cross_attention_mask(rows, pixels.num_tiles, 128256)).logits[0, -1]
    probs = logits.double().softmax(-1)
    p_unsafe, binary = guard.score(msgs)
    assert p_unsafe == pytest.approx(float(probs[UNSAFE_ID]), rel=1e-3)
    assert binary == pytest.approx(float(probs[UNSAFE_ID] / (probs[UNSAFE_ID] + probs[SAFE_ID])), rel=1e-3)
    text_only = guard.score([{"role": "user", "content": "Is it ok?"}, msgs[1]])
    assert text_only != (p_unsafe, binary)
    # The generation path runs with the image in the cache; a random model answers neither safe nor unsafe.
    with pytest.raises(GuardOutputError, match="which is neither 'safe' nor 'unsafe"):
        guard.check(msgs, max_tokens=3)
