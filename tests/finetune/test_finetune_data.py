"""finetune/data.py: golden loss masks (assistant spans exactly), record forms, bad lines with line numbers,
length limits, the split, packing (positions restart, no attention across examples) and batches."""

from __future__ import annotations

import pytest
import torch
from conftest import llama3_tokenizer_path, smollm2_gguf_path
from ft_fixtures import chat, write_jsonl

from pocketllama.chat_format import get_chat_format
from pocketllama.finetune.data import (
    IGNORE,
    Example,
    collate,
    encode_chat,
    encode_raw,
    epoch_rows,
    load_examples,
    record_to_messages,
    split_examples,
)
from pocketllama.tokenizer import Tokenizer

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Goodbye."}]
DATE = "26 Jul 2024"


@pytest.fixture(scope="module")
def llama3():
    tok = Tokenizer.from_tiktoken(llama3_tokenizer_path())
    return tok, get_chat_format(tok)


@pytest.fixture(scope="module")
def smollm2():
    from pocketllama.weights import open_checkpoint

    checkpoint = open_checkpoint(smollm2_gguf_path())
    tok = checkpoint.load_tokenizer()
    return tok, get_chat_format(tok, checkpoint.chat_template())


def spans(ids: list[int], trained: list[bool]) -> list[list[int]]:
    out, cur = [], []
    for i, t in zip(ids, trained, strict=True):
        if t:
            cur.append(i)
        elif cur:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


def test_llama3_golden_mask(llama3):
    tok, fmt = llama3
    ids, trained = encode_chat(fmt, tok, CONVERSATION, date_string=DATE)
    # <|begin_of_text|> system block ... user "Hi" ... assistant header, then the trained spans:
    # "Hello!" = [9906, 0] + <|eot_id|>, "Goodbye." = [15571, 29474, 13] + <|eot_id|>
    assert ids == [128000, 128006, 9125, 128007, 271, 38766, 1303, 33025, 2696, 25, 6790, 220, 2366, 18, 198, 15724,
                   2696, 25, 220, 1627, 10263, 220, 2366, 19, 271, 3513, 10015, 13, 128009, 128006, 882, 128007, 271,
                   13347, 128009, 128006, 78191, 128007, 271, 9906, 0, 128009, 128006, 882, 128007, 271, 1383, 68,
                   128009, 128006, 78191, 128007, 271, 15571, 29474, 13, 128009]
    assert spans(ids, trained) == [[9906, 0, 128009], [15571, 29474, 13, 128009]]
    assert sum(trained) == 7  # the assistant header (128006 78191 128007 271) is never trained
    # the same ids chat inference builds: prompt (with the generation header) + the answer
    assert ids == fmt.encode(CONVERSATION, add_generation_prompt=False, date_string=DATE)


def test_llama3_train_only_selected_turns(llama3):
    tok, fmt = llama3
    ids, trained = encode_chat(fmt, tok, CONVERSATION, train=[2], date_string=DATE)
    assert spans(ids, trained) == [[9906, 0, 128009]]
    # the conversation after the last trained turn is left out: the ids end with turn 2's <|eot_id|>
    assert ids == encode_chat(fmt, tok, CONVERSATION, date_string=DATE)[0][:42] and ids[-3:] == [9906, 0, 128009]


def test_jinja_template_golden_mask(smollm2):
    tok, fmt = smollm2
    ids, trained = encode_chat(fmt, tok, CONVERSATION[1:])
    # "Hello!" [19556, 17], "<|im_end|>" 2, "\n" 198; "Goodbye." [14229, 25257, 30]
    assert spans(ids, trained) == [[19556, 17, 2, 198], [14229, 25257, 30, 2, 198]]
    assert tok.decode(ids) == fmt.render(CONVERSATION[1:], add_generation_prompt=False)
    untrained = tok.decode([i for i, t in zip(ids, trained, strict=True) if not t])
    assert untrained.endswith("<|im_start|>assistant\n") and "Hello" not in untrained


def test_template_that_rewrites_history_is_refused(llama3):
    from pocketllama.chat_format import JinjaChatFormat

    tok, _ = llama3
    # a template that renders only the last message: earlier turns disappear once a new one is added
    fmt = JinjaChatFormat(tok, "{{ messages[-1]['content'] }}{% if add_generation_prompt %}>{% endif %}")
    with pytest.raises(ValueError, match="does not render message 1 after the conversation before it"):
        encode_chat(fmt, tok, CONVERSATION[1:])


def test_no_assistant_turn(llama3):
    tok, fmt = llama3
    with pytest.raises(ValueError, match="no assistant message to learn from"):
        encode_chat(fmt, tok, [{"role": "user", "content": "Hi"}])
    with pytest.raises(ValueError, match="message 1 is a 'user' message; only assistant turns are trained"):
        encode_chat(fmt, tok, CONVERSATION, train=[1])


def test_prompt_completion_forms(llama3):
    tok, fmt = llama3
    messages, train, image = record_to_messages({"prompt": "Hi", "completion": "Hello!"})
    assert messages == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert train == [1] and image is None
    # conversational prompt/completion: an assistant turn inside the prompt is context, not a target
    messages, train, _ = record_to_messages({"prompt": CONVERSATION[:4], "completion": CONVERSATION[4:]})
    assert train == [4]
    ids, trained = encode_chat(fmt, tok, messages, train=train, date_string=DATE)
    assert spans(ids, trained) == [[15571, 29474, 13, 128009]]
    ids, trained = encode_raw(tok, "2+2=", "4")
    assert ids == [128000] + tok.encode("2+2=") + tok.encode("4") + [tok.eos_id]
    assert trained == [False] * (len(ids) - 2) + [True, True]


@pytest.mark.parametrize("record, message", [
    ([1, 2], "record is a JSON list, not an object"),
    ({"text": "x"}, "neither 'messages' nor 'prompt' \\+ 'completion' \\(keys: \\['text'\\]\\)"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": ["hi"]}, "message 0 is not an object with a 'role'"),
    ({"prompt": "a", "completion": ["b"]}, "must both be strings or both lists of messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image"}]}], "images": ["a.png", "b.png"]},
     "'images' has 2 image\\(s\\) but the messages have 1 image part"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "image": "a"}, {"type": "image", "image": "b"}]}]},
     "2 images in one example"),
])
def test_record_errors(record, message):
    with pytest.raises(ValueError, match=message):
        record_to_messages(record)


def test_bad_lines_are_reported_with_line_numbers(llama3, tmp_path):
    tok, fmt = llama3
    path = write_jsonl(tmp_path / "d.jsonl", [chat("Hi", "Hello!"), "{not json", "", {"messages": [
        {"role": "user", "content": "only a question"}]}, chat("Bye", "Goodbye.")])
    examples, report = load_examples(path, tok, fmt, max_len=512, date_string=DATE)
    assert [e.line for e in examples] == [1, 5]
    assert [n for n, _ in report.bad] == [2, 4]
    assert "line 2: not valid JSON" in report.summary()
    assert "line 4: the conversation has no assistant message" in report.summary()
    with pytest.raises(ValueError, match="d.jsonl line 2: not valid JSON .* --bad-lines skip"):
        load_examples(path, tok, fmt, max_len=512, on_error="error")


def test_images_need_a_vision_model(llama3, tmp_path):
    tok, fmt = llama3
    path = write_jsonl(tmp_path / "v.jsonl", [{"messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A cat."}], "images": ["cat.png"]}, chat("Hi", "Hello!")])
    examples, report = load_examples(path, tok, fmt, max_len=512)
    assert report.bad == [(1, "the example has an image but the model is text-only (images need Llama 3.2 "
                               "Vision)")]
    assert len(examples) == 1


def test_length_limit_truncates_or_drops(llama3, tmp_path):
    tok, fmt = llama3
    long_answer = " ".join(["word"] * 50)
    path = write_jsonl(tmp_path / "l.jsonl", [chat("Hi", "Hello!"), chat("Tell me", long_answer),
                                              chat(" ".join(["q"] * 80), "A.")])
    examples, report = load_examples(path, tok, fmt, max_len=60, date_string=DATE)
    assert [e.line for e in examples] == [1, 2] and report.truncated == [2]
    assert len(examples[1]) == 60 and all(examples[1].trained[-5:])
    assert report.dropped == [(3, "no assistant token within the first 60 tokens")]
    assert "truncated 1 example(s) to the length limit: lines 2" in report.summary()
    examples, report = load_examples(path, tok, fmt, max_len=60, too_long="drop", date_string=DATE)
    assert [e.line for e in examples] == [1] and [n for n, _ in report.dropped] == [2, 3]
    assert report.dropped[0][1].endswith("tokens > max_len 60")


def test_empty_or_missing_file(llama3, tmp_path):
    tok, fmt = llama3
    with pytest.raises(FileNotFoundError, match="data file .*nope.jsonl does not exist"):
        load_examples(tmp_path / "nope.jsonl", tok, fmt, max_len=8)
    path = write_jsonl(tmp_path / "e.jsonl", ["{}"])
    with pytest.raises(ValueError, match="e.jsonl has no usable examples"):
        load_examples(path, tok, fmt, max_len=8)


def test_split_is_seeded_and_disjoint():
    examples = [Example([1, 2], [False, True], n) for n in range(1, 21)]
    train, val = split_examples(examples, 0.1, seed=3)
    assert len(val) == 2 and len(train) == 18
    assert {e.line for e in train} | {e.line for e in val} == set(range(1, 21))
    assert [e.line for e in split_examples(examples, 0.1, seed=3)[1]] == [e.line for e in val]
    assert split_examples(examples, 0.0, seed=3)[1] == []
    with pytest.raises(ValueError, match="validation fraction must be in \\[0, 1\\), got 1.5"):
        split_examples(examples, 1.5, seed=0)


def test_collate_unpacked_rows():
    a = Example([5, 6, 7, 8], [False, False, True, True], 1)
    b = Example([9, 10], [False, True], 2)
    batch = collate([[a], [b]], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert batch.targets.tolist() == [[IGNORE, 7, 8, IGNORE], [10, IGNORE, IGNORE, IGNORE]]
    assert batch.attn_mask is None and batch.num_targets == 3 and batch.num_tokens == 6


def test_packing_restarts_positions_and_blocks_attention():
    a = Example([5, 6, 7], [False, True, True], 1)
    b = Example([8, 9], [False, True], 2)
    rows = epoch_rows([a, b, Example([1] * 4, [False, False, False, True], 3)], 0, 0, shuffle=False,
                      packing=True, max_len=6)
    assert [[e.line for e in row] for row in rows] == [[1, 2], [3]]
    batch = collate(rows, pad_id=0)
    assert batch.positions.tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]]
    # the last token of `a` does not learn to predict the first token of `b`
    assert batch.targets.tolist() == [[6, 7, IGNORE, 9, IGNORE], [IGNORE, IGNORE, 1, IGNORE, IGNORE]]
    assert batch.attn_mask[0, 0].int().tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0],
                                                    [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]
    assert batch.attn_mask[1, 0, 4].int().tolist() == [0, 0, 0, 0, 1]  # padding sees only padding
    assert batch.num_tokens == 9 and batch.num_targets == 4


def test_packed_forward_equals_separate_forwards(tiny_llama_dir):
    """A packed row's logits equal each example's own forward: no attention crosses examples."""
    from pocketllama.llm import load_model

    model, _ = load_model(tiny_llama_dir[0], dtype="float32")
    g = torch.Generator().manual_seed(0)
    a = Example(torch.randint(3, 300, (7,), generator=g).tolist(), [True] * 7, 1)
    b = Example(torch.randint(3, 300, (5,), generator=g).tolist(), [True] * 5, 2)
    batch = collate([[a, b]])
    with torch.no_grad():
        packed = model(batch.input_ids, batch.positions, attn_mask=batch.attn_mask)[0]  # (12, V)
        alone_a = model(torch.tensor([a.ids]))[0]
        alone_b = model(torch.tensor([b.ids]))[0]
        leaky = model(batch.input_ids, batch.positions)[0]  # plain causal: b would see a
    torch.testing.assert_close(packed[:7], alone_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[7:], alone_b, atol=1e-5, rtol=1e-5)
    assert (leaky[7:] - alone_b).abs().max() > 1e-3


def test_attn_mask_with_a_cache_is_refused(tiny_llama_dir):
    from pocketllama.llm import load_model

    model, _ = load_model(tiny_llama_dir[0], dtype="float32")
    cache = model.make_cache(1, 16)
    with pytest.raises(ValueError, match="attn_mask applies to a whole-sequence forward"):
        model(torch.tensor([[3, 4]]), cache=cache, attn_mask=torch.ones(1, 1, 2, 2, dtype=torch.bool))
