"""Shared, cached test assets for the tokenizer and chat-format tests: a multilingual corpus, the real
Llama 3 tiktoken file, the SmolLM2 GGUF vocabulary, and GGUF/HF-shaped copies of the Llama 3 vocabulary.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from conftest import llama3_tokenizer_path, smollm2_gguf_path

# English, German, French, Italian, Portuguese, Hindi, Spanish, Vietnamese, Thai, code, emoji, whitespace runs.
CORPUS: tuple[str, ...] = (
    "This is a test sentence.",
    "The quick brown fox jumps over the lazy dog. It's 3:45pm; we'll see what they've done!",
    "Über die Brücke gehen Müller, Strauß und Jäger – größer, schöner, weiß.",
    "Où est la bibliothèque ? L'été dernier, j'ai mangé des crêpes à Noël.",
    "Perché l'acqua è così fredda? Però, più tardi andrò là.",
    "Não sei se você já viu as ações da companhia; coração, pão e avó.",
    "नमस्ते, आप कैसे हैं? मैं हिंदी में लिख रहा हूँ।",
    "¿Dónde está el niño? ¡Qué mañana tan señorial! Año 2024.",
    "Tôi không biết nhiều về việc hợp tác ở Việt Nam, điều đó ngoài tầm.",  # whole-word vocab hits (ignore_merges)
    "สวัสดีครับ วันนี้อากาศดีมาก ภาษาไทยไม่มีการเว้นวรรคระหว่างคำ",
    'def fib(n: int) -> int:\n    """Fibonacci."""\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n',
    'for (int i = 0; i < 10; ++i) { printf("%d\\n", i * 12345); }  // C\r\n',
    "Emoji: 😀 👍🏽 🇫🇷 👨‍👩‍👧‍👦 ❤️ 🧑🏿‍🚀 and 日本語のテキスト, 中文, 한국어.",
    "Numbers: 1 12 123 1234 12345 123456 3.14159 -42 1e10 0x1F",
    "   leading spaces, trailing spaces   ",
    "a" + " " * 300 + "b" + "\n" * 50 + "c" + "\t" * 40 + " \u00a0 \u3000 x\n\n\n  \n",
    " " * 1000,
    "x\n\n\ny\r\n\r\nz \n \n",
    "I'M SHOUTING, YOU'RE NOT. THEY'LL, WE'D, SHE'S.",
    "",
)
SPECIAL_TEXT = "Hi <|begin_of_text|> there <|eot_id|><|start_header_id|>user<|end_header_id|> x <|im_end|>"


@lru_cache(maxsize=1)
def llama3_ranks() -> dict[bytes, int]:
    """The Llama 3 ranks read by tiktoken's own loader (independent of pocketllama's parser)."""
    from tiktoken.load import load_tiktoken_bpe

    return load_tiktoken_bpe(str(llama3_tokenizer_path()))


@lru_cache(maxsize=1)
def llama3():
    from pocketllama.tokenizer import Tokenizer

    return Tokenizer.from_tiktoken(llama3_tokenizer_path())


def meta_special_names() -> list[str]:
    """SPEC 4, Meta column, written out independently of pocketllama."""
    named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
             "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
             "<|eot_id|>", "<|python_tag|>", "<|image|>"]  # fmt: skip
    return named + [f"<|reserved_special_token_{i}|>" for i in range(2, 246)]


@lru_cache(maxsize=1)
def _byte_table() -> dict[int, str]:
    """GPT-2 byte -> unicode spelling, written out here so the test does not trust pocketllama's table."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table, n = {x: chr(x) for x in keep}, 0
    for x in range(256):
        if x not in table:
            table[x], n = chr(256 + n), n + 1
    return table


def _byte_level(b: bytes) -> str:
    table = _byte_table()
    return "".join(table[x] for x in b)


@lru_cache(maxsize=1)
def llama3_vocab_and_merges() -> tuple[list[str], list[str]]:
    """Byte-level tokens and merges for the Llama 3 ranks, as llama.cpp's converter writes them to a GGUF
    (every split of a token into two tokens, ordered by the merged token's rank)."""
    ranks = llama3_ranks()
    tokens = [""] * len(ranks)
    merges: list[tuple[int, bytes, bytes]] = []
    for token, rank in ranks.items():
        tokens[rank] = _byte_level(token)
        splits = [
            (token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks
        ]
        splits.sort(key=lambda p: (ranks[p[0]], ranks[p[1]]))
        merges += [(rank, left, right) for left, right in splits]
    merges.sort(key=lambda m: m[0])
    return tokens, [f"{_byte_level(left)} {_byte_level(right)}" for _, left, right in merges]


def llama3_gguf_metadata(eos: int = 128009) -> dict[str, Any]:
    """tokenizer.* metadata of a Llama 3.2 Instruct GGUF (eos = <|eot_id|>, as llama.cpp's converter sets it)."""
    tokens, merges = llama3_vocab_and_merges()
    names = meta_special_names()
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "llama-bpe",
        "tokenizer.ggml.tokens": tokens + names,
        "tokenizer.ggml.token_type": [1] * len(tokens) + [3] * len(names),
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 128000,
        "tokenizer.ggml.eos_token_id": eos,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.chat_template": "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}",
    }


@lru_cache(maxsize=1)
def smollm2_metadata() -> dict[str, Any]:
    """tokenizer.* keys of the real SmolLM2 GGUF as plain Python values (gguf.GGUFReader, gguf 0.19)."""
    import gguf

    reader = gguf.GGUFReader(str(smollm2_gguf_path()))
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


@lru_cache(maxsize=1)
def smollm2():
    from pocketllama.tokenizer import Tokenizer

    return Tokenizer.from_gguf_metadata(smollm2_metadata())


@lru_cache(maxsize=1)
def hf_smollm2():
    """The oracle: transformers' tokenizer built from the same GGUF."""
    from transformers import AutoTokenizer

    path = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
