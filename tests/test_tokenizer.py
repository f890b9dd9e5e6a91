"""Tokenizer tests: golden ids (SPEC 4), parity with tiktoken / Meta / transformers, special-token
handling, the streaming detokenizer, and every loader error message.
"""

from __future__ import annotations

import json
import random

import pytest
import tiktoken
import tokenizers
from conftest import llama3_tokenizer_path
from tokenizer_assets import (
    CORPUS,
    SPECIAL_TEXT,
    hf_smollm2,
    llama3,
    llama3_gguf_metadata,
    llama3_ranks,
    llama3_vocab_and_merges,
    meta_special_names,
    smollm2,
    smollm2_metadata,
)

from pocketllama.tokenizer import Tokenizer

SPEC4_PATTERN = (  # copied from SPEC section 4, not from pocketllama
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
THAI_EMOJI = "ภาษาไทย 👨‍👩‍👧‍👦🇫🇷 नमस्ते 🧑🏿‍🚀"


@pytest.fixture(scope="module")
def oracle() -> tiktoken.Encoding:
    """tiktoken used directly with the ranks, pattern and specials of SPEC 4."""
    specials = {name: 128000 + i for i, name in enumerate(meta_special_names())}
    return tiktoken.Encoding("llama3-oracle", pat_str=SPEC4_PATTERN, mergeable_ranks=llama3_ranks(),
                             special_tokens=specials)  # fmt: skip


@pytest.fixture(scope="module")
def meta_tok():
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    return MetaTokenizer(llama3_tokenizer_path())


def stream(tok: Tokenizer, ids: list[int], **kw) -> list[str]:
    detok = tok.detokenizer(**kw)
    return [detok.add(i) for i in ids] + [detok.flush()]


# ---- Llama 3 tiktoken file ------------------------------------------------------------------------


def test_meta_test_vector():
    tok = llama3()
    assert tok.encode("This is a test sentence.") == [2028, 374, 264, 1296, 11914, 13]
    assert tok.encode("This is a test sentence.", add_bos=True) == [128000, 2028, 374, 264, 1296, 11914, 13]


@pytest.mark.parametrize(
    "text, ids",
    [("system", [9125]), ("user", [882]), ("assistant", [78191]), ("ipython", [23799, 4690]), ("\n\n", [271]),
     ("\n", [198]), (" ", [220]), ("safe", [19193]), ("unsafe", [39257]), ("\n\nsafe", [271, 19193]),
     ("unsafe\nS1", [39257, 198, 50, 16]), ("S13", [50, 1032]), ("S14", [50, 975])],
)  # fmt: skip
def test_spec4_vectors(text, ids):
    assert llama3().encode(text) == ids


def test_header_needs_allow_special():
    tok = llama3()
    header = "<|start_header_id|>user<|end_header_id|>\n\n"
    assert tok.encode(header, allow_special=True) == [128006, 882, 128007, 271]
    plain = tok.encode(header)
    assert not set(plain) & set(tok.special_tokens.values())
    assert tok.decode(plain) == header


def test_llama3_special_tokens_and_ids():
    tok = llama3()
    assert tok.vocab_size == 128256
    assert tok.special_tokens == {name: 128000 + i for i, name in enumerate(meta_special_names())}
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (128000, 128001, 128004)
    assert tok.stop_ids == {128001, 128008, 128009}
    assert tok.add_bos is True and tok.chat_template is None
    assert tok.token_to_id("<|image|>") == 128011 and tok.token_to_id("<|step_id|>") == 128005
    assert tok.token_to_id("<|reserved_special_token_245|>") == 128255
    assert tok.token_to_id(" sentence") == 11914 and tok.token_to_id("not one token at all") is None
    assert tok.id_to_token(128009) == "<|eot_id|>" and tok.id_to_token(11914) == " sentence"
    assert tok.token_bytes(11914) == b" sentence"


@pytest.mark.parametrize("text", CORPUS)
def test_llama3_matches_tiktoken(oracle, text):
    tok = llama3()
    assert tok.encode(text) == oracle.encode(text, disallowed_special=())
    assert tok.decode(tok.encode(text)) == text


def test_llama3_specials_parsed_only_when_allowed(oracle):
    tok = llama3()
    plain = tok.encode(SPECIAL_TEXT)
    assert plain == oracle.encode(SPECIAL_TEXT, disallowed_special=())
    assert not set(plain) & set(tok.special_tokens.values())
    special = tok.encode(SPECIAL_TEXT, allow_special=True)
    assert special == oracle.encode(SPECIAL_TEXT, allowed_special="all")
    assert {128000, 128009, 128006, 128007} <= set(special)
    assert tok.encode("<|eot_id|>", allow_special=True) == [128009]
    assert tok.decode(special) == tok.decode(plain) == SPECIAL_TEXT
    assert tok.decode(special, skip_special=True) == "Hi  there user x <|im_end|>"


def test_llama3_matches_meta_tokenizer(meta_tok):
    tok = llama3()
    for text in [*CORPUS, SPECIAL_TEXT]:
        ids = tok.encode(text, add_bos=True)
        assert ids == meta_tok.encode(text, bos=True, eos=False)
        assert tok.decode(ids) == meta_tok.decode(ids)


def test_llama3_long_input_guards_match_meta(meta_tok, oracle):
    # Runs longer than 25,000 chars are cut every 25,000 chars; inputs are cut into 400,000-char chunks.
    text = "a" * 60_007 + " " * 30_001 + "b c " * 100_000 + "\n" * 26_000 + "é" * 25_001
    ids = llama3().encode(text)
    assert ids == meta_tok.encode(text, bos=False, eos=False)
    assert ids != oracle.encode_ordinary(text)  # the guard changed the cut, as in Meta's tokenizer
    assert llama3().decode(ids) == text


def test_llama3_detokenizer_never_splits_a_character():
    tok = llama3()
    ids = tok.encode(THAI_EMOJI)
    pieces = stream(tok, ids)
    assert "".join(pieces) == THAI_EMOJI
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces[:-1]  # some token ended inside a character, and its bytes were held back


def test_llama3_detokenizer_equals_decode_on_random_ids(oracle):
    tok, rng = llama3(), random.Random(0)
    # single-byte tokens that start or continue multi-byte characters (plus an invalid 0xFF)
    byte_ids = [
        oracle.encode_single_token(bytes([b])) for b in (0xE0, 0xB8, 0xF0, 0x9F, 0x98, 0x80, 0xC3, 0xFF)
    ]
    for _ in range(50):
        ids = [rng.choice(byte_ids) if rng.random() < 0.5 else rng.randrange(128256) for _ in range(20)]
        assert "".join(stream(tok, ids)) == tok.decode(ids)
        assert "".join(stream(tok, ids, skip_special=True)) == tok.decode(ids, skip_special=True)


def test_detokenizer_flush_emits_unfinished_bytes_and_resets(oracle):
    tok = llama3()
    detok = tok.detokenizer()
    first = oracle.encode_single_token(b"\xf0")  # first byte of a 4-byte character
    assert detok.add(first) == ""
    assert detok.flush() == "\ufffd" == tok.decode([first])
    assert detok.add(tok.encode("ok")[0]) == "ok"


# ---- GGUF vocabularies -----------------------------------------------------------------------------


def test_smollm2_gguf_matches_transformers():
    tok, hf = smollm2(), hf_smollm2()
    for text in [*CORPUS, SPECIAL_TEXT]:
        expected = hf.encode(text, add_special_tokens=False)
        assert tok.encode(text, allow_special=True) == expected, text
        assert tok.decode(expected) == hf.decode(
            expected, skip_special_tokens=False, clean_up_tokenization_spaces=False
        )


def test_smollm2_gguf_ids_and_stops():
    tok = smollm2()
    assert tok.vocab_size == 49152
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (1, 2, 2, 0)
    assert tok.special_tokens["<|im_start|>"] == 1 and tok.special_tokens["<|im_end|>"] == 2
    assert len(tok.special_tokens) == 17  # the control tokens (type 3) of the file
    # eos <|im_end|>, plus <|endoftext|>: a control token with an end-of-generation name (as llama.cpp)
    assert tok.stop_ids == {0, 2}
    assert tok.add_bos is False
    assert tok.chat_template == smollm2_metadata()["tokenizer.chat_template"]
    assert tok.encode("12345") == [33, 34, 35, 36, 37]  # smollm pre-tokenizer: one digit per token


def test_smollm2_specials_plain_unless_allowed():
    tok = smollm2()
    plain = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert 1 not in plain and 2 not in plain
    assert tok.decode(plain) == "<|im_start|>user\nhi<|im_end|>"
    assert tok.encode("<|im_start|>user\nhi<|im_end|>", allow_special=True)[0] == 1
    assert tok.encode("<|im_end|>", allow_special=True) == [2]


def test_smollm2_token_bytes_match_decode_for_every_id():
    tok = smollm2()
    for i in range(tok.vocab_size):
        assert tok.token_bytes(i).decode("utf-8", errors="replace") == tok.decode([i])


def test_smollm2_detokenizer_streams_exactly_decode():
    tok = smollm2()
    ids = tok.encode(THAI_EMOJI)
    pieces = stream(tok, ids)
    assert "".join(pieces) == THAI_EMOJI and "" in pieces[:-1]
    assert all("\ufffd" not in p for p in pieces)
    rng = random.Random(1)
    for _ in range(30):
        ids = [rng.randrange(tok.vocab_size) for _ in range(25)]
        assert "".join(stream(tok, ids)) == tok.decode(ids)
        assert "".join(stream(tok, ids, skip_special=True)) == tok.decode(ids, skip_special=True)


def test_llama3_gguf_vocab_matches_tiktoken(oracle):
    tok = Tokenizer.from_gguf_metadata(llama3_gguf_metadata())
    assert tok.vocab_size == 128256 and len(llama3_vocab_and_merges()[1]) == 280147
    for text in CORPUS:
        assert tok.encode(text) == oracle.encode(text, disallowed_special=()), text
    assert tok.encode(SPECIAL_TEXT) == oracle.encode(SPECIAL_TEXT, disallowed_special=())
    assert tok.encode(SPECIAL_TEXT, allow_special=True) == oracle.encode(SPECIAL_TEXT, allowed_special="all")
    # Instruct GGUFs set eos = <|eot_id|>; the end-named control tokens complete Meta's stop set.
    assert tok.stop_ids == {128001, 128008, 128009} and tok.eos_id == 128009
    assert tok.add_bos is True and tok.bos_id == 128000
    assert tok.special_tokens == llama3().special_tokens
    ids = tok.encode(THAI_EMOJI)
    assert "".join(stream(tok, ids)) == THAI_EMOJI


def test_gguf_metadata_may_hold_numpy_values():
    import numpy as np

    meta = smollm2_metadata()
    types = np.asarray(meta["tokenizer.ggml.token_type"], dtype=np.int32)
    tok = Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.token_type": types,
                                        "tokenizer.ggml.eos_token_id": np.uint32(2)})  # fmt: skip
    assert tok.eos_id == 2 and type(tok.eos_id) is int and tok.special_tokens == smollm2().special_tokens


def test_gguf_eot_and_eom_ids_are_stops():
    meta = dict(smollm2_metadata(), **{"tokenizer.ggml.eot_token_id": 5, "tokenizer.ggml.eom_token_id": 6})
    assert Tokenizer.from_gguf_metadata(meta).stop_ids == {0, 2, 5, 6}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"tokenizer.ggml.model": "llama"}, "'tokenizer.ggml.model' is 'llama' (SentencePiece"),
        ({"tokenizer.ggml.model": "bert"}, "'tokenizer.ggml.model' is 'bert'; pocketllama reads 'gpt2'"),
        ({"tokenizer.ggml.tokens": None}, "no list 'tokenizer.ggml.tokens'"),
        ({"tokenizer.ggml.merges": None}, "no list 'tokenizer.ggml.merges'"),
        ({"tokenizer.ggml.pre": "mystery"}, "'tokenizer.ggml.pre' is 'mystery', a pre-tokenizer pocketllama"),
        ({"tokenizer.ggml.token_type": [1, 1]}, "'tokenizer.ggml.token_type' has 2 entries"),
        ({"tokenizer.ggml.merges": ["a b", "abc"]}, "'tokenizer.ggml.merges'[1] = 'abc' is not two tokens"),
        ({"tokenizer.ggml.eos_token_id": 10**6}, "'tokenizer.ggml.eos_token_id' = 1000000 is not a token id"),
    ],
)
def test_gguf_errors_name_the_key(change, message):
    meta = dict(smollm2_metadata(), **change)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        Tokenizer.from_gguf_metadata(meta)


def test_gguf_duplicate_token_strings_are_reported():
    meta = dict(smollm2_metadata())
    tokens = list(meta["tokenizer.ggml.tokens"])
    tokens[1] = tokens[0]  # two control tokens with one spelling
    meta["tokenizer.ggml.tokens"] = tokens
    with pytest.raises(
        ValueError, match=r"has 49152 tokens but 49151 after adding .* \(duplicate token strings\?\)"
    ):
        Tokenizer.from_gguf_metadata(meta)


# ---- HF tokenizer.json folders ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama3_hf_dir(tmp_path_factory):
    """A Llama 3.2 Instruct-shaped HF folder: tokenizer.json whose post-processor prepends BOS."""
    tokens, merges = llama3_vocab_and_merges()
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(
        vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ")) for m in merges],
        ignore_merges=True))  # fmt: skip
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
        [tokenizers.pre_tokenizers.Split(tokenizers.Regex(SPEC4_PATTERN), behavior="isolated"),
         tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])  # fmt: skip
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.add_special_tokens(
        [tokenizers.AddedToken(n, special=True, normalized=False) for n in meta_special_names()]
    )
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", 128000)])  # fmt: skip
    path = tmp_path_factory.mktemp("llama3_hf")
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
        "chat_template": [{"name": "default", "template": "{{ bos_token }}default"},
                          {"name": "tool_use", "template": "{{ bos_token }}tools"}]}))  # fmt: skip
    (path / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]})
    )
    return path


def test_hf_dir_llama3(llama3_hf_dir, oracle):
    tok = Tokenizer.from_hf_dir(llama3_hf_dir)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (128000, 128009, 128256)
    assert tok.stop_ids == {128001, 128008, 128009}
    assert tok.add_bos is True  # read from the BOS-adding post-processor
    assert tok.chat_template == "{{ bos_token }}default" and set(tok.chat_templates) == {
        "default",
        "tool_use",
    }
    assert tok.special_tokens == llama3().special_tokens
    for text in CORPUS:
        ids = tok.encode(text)  # our encode never adds BOS on its own, even though the post-processor would
        assert ids == oracle.encode(text, disallowed_special=()), text
        assert tok.decode(ids) == text
    assert tok.encode("hi", add_bos=True) == [128000, 6151]
    assert tok.encode(SPECIAL_TEXT) == oracle.encode(SPECIAL_TEXT, disallowed_special=())
    assert tok.encode(SPECIAL_TEXT, allow_special=True) == oracle.encode(SPECIAL_TEXT, allowed_special="all")
    assert "".join(stream(tok, tok.encode(THAI_EMOJI))) == THAI_EMOJI


def test_hf_dir_add_bos_token_in_config_wins(llama3_hf_dir, tmp_path):
    for name in ("tokenizer.json", "generation_config.json"):
        (tmp_path / name).write_bytes((llama3_hf_dir / name).read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"add_bos_token": False, "eos_token": "<|eot_id|>"})
    )
    (tmp_path / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": {"content": "<|begin_of_text|>"}})
    )
    (tmp_path / "chat_template.jinja").write_text("{{ messages }}")
    tok = Tokenizer.from_hf_dir(tmp_path / "tokenizer.json")
    assert tok.add_bos is False and tok.bos_id == 128000  # bos from special_tokens_map.json
    assert tok.chat_template == "{{ messages }}"


def test_hf_dir_saved_by_transformers(tmp_path):
    """SmolLM2 saved by transformers (tokenizer.json + tokenizer_config.json): same ids, specials, template."""
    hf = hf_smollm2()
    hf.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "bos_token_id": 1}))
    tok, gguf_tok = Tokenizer.from_hf_dir(tmp_path), smollm2()
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (1, 2, 2, 0)
    assert tok.stop_ids == {2} and tok.add_bos is False
    assert tok.chat_template == gguf_tok.chat_template
    assert tok.special_tokens == gguf_tok.special_tokens
    for text in [*CORPUS, SPECIAL_TEXT]:
        assert tok.encode(text) == gguf_tok.encode(text), text
        assert tok.encode(text, allow_special=True) == hf.encode(text, add_special_tokens=False), text


def test_hf_dir_non_byte_level_vocab_streams_through_decode_window(tmp_path):
    """A SentencePiece-style tokenizer.json (▁ spaces, byte fallback): the detokenizer still equals decode."""
    pieces = [
        "<unk>",
        "▁",
        *"abcdefghijklmnopqrstuvwxyz",
        "▁h",
        "▁he",
        "ll",
        "llo",
        *(f"<0x{b:02X}>" for b in range(256)),
    ]
    vocab = {p: i for i, p in enumerate(dict.fromkeys(pieces))}
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[("▁", "h"), ("▁h", "e"), ("l", "l"), ("ll", "o")],
                                                     unk_token="<unk>", byte_fallback=True))  # fmt: skip
    tok.normalizer = tokenizers.normalizers.Sequence(
        [tokenizers.normalizers.Prepend("▁"), tokenizers.normalizers.Replace(" ", "▁")]
    )
    d = tokenizers.decoders
    tok.decoder = d.Sequence([d.Replace("▁", " "), d.ByteFallback(), d.Fuse(), d.Strip(" ", 1, 0)])
    tok.save(str(tmp_path / "tokenizer.json"))
    ours = Tokenizer.from_hf_dir(tmp_path)
    text = "hello wörld 😀 ok"
    ids = ours.encode(text)
    assert ours.decode(ids) == text
    pieces_out = stream(ours, ids)
    assert "".join(pieces_out) == text and all("\ufffd" not in p for p in pieces_out)


# ---- errors ----------------------------------------------------------------------------------------


def test_tiktoken_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="Llama 3 tokenizer file not found: .*nope.model"):
        Tokenizer.from_tiktoken(tmp_path / "nope.model")


@pytest.mark.parametrize(
    "content, message",
    [
        (b"IQ== 0\nIg== 1\nnot-base64!! 2\n", r"line 3 is not 'base64\(token\) rank'"),
        (b"IQ== 0\nIg==\n", r"line 2 is not 'base64\(token\) rank' \(expected 2 fields\)"),
        (b"IQ== zero\n", r"line 1 is not 'base64\(token\) rank'"),
        (b"IQ== 0\nIg== 2\n", r"ranks are not 0..1 without gaps or repeats"),
        (b"\n\n", r"no tokens; is this a Llama 3 tiktoken tokenizer.model"),
    ],
)
def test_tiktoken_malformed_file(tmp_path, content, message):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"{tmp_path}.*{message}"):
        Tokenizer.from_tiktoken(path)


def test_hf_dir_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json in .*use Tokenizer.from_tiktoken"):
        Tokenizer.from_hf_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{ not json")
    with pytest.raises(ValueError, match="tokenizer.json is not a valid tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)
    hf_smollm2().backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text("{ nope")
    with pytest.raises(ValueError, match="tokenizer_config.json is not valid JSON"):
        Tokenizer.from_hf_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="tokenizer_config.json should hold a JSON object, got list"):
        Tokenizer.from_hf_dir(tmp_path)


def test_encode_decode_argument_errors():
    tok = llama3()
    with pytest.raises(TypeError, match="Tokenizer.encode expects a str, got bytes"):
        tok.encode(b"hi")
    with pytest.raises(ValueError, match=r"token id 128256 is outside the vocabulary \(0..128255\)"):
        tok.decode([1, 128256])
    with pytest.raises(ValueError, match="token id -1 is outside"):
        tok.decode([-1])
    no_bos = Tokenizer.from_gguf_metadata({**smollm2_metadata(), "tokenizer.ggml.bos_token_id": None})
    with pytest.raises(ValueError, match="add_bos=True but the tokenizer .* has no BOS token"):
        no_bos.encode("hi", add_bos=True)
