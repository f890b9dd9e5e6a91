"""`pocketllama cache-prompt`, `--prompt-cache`, `--draft-model` / `--prompt-lookup` on generate and chat, and
`load(draft=...)` / multi-turn `LLM.chat` prefix reuse, on a tiny random Llama with the real Llama 3 tokenizer."""

from __future__ import annotations

import re
import shutil

import pytest
import torch
from conftest import llama3_tokenizer_path, save_tiny_llama

from pocketllama.cli import main as cli_main
from pocketllama.llm import load


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def save_llama3_tiny(path, seed: int = 0, **overrides):
    kw = dict(vocab_size=128256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, bos_token_id=128000, eos_token_id=[128001, 128008, 128009])
    save_tiny_llama(path, seed=seed, **{**kw, **overrides})
    (path / "original").mkdir(exist_ok=True)
    shutil.copy(llama3_tokenizer_path(), path / "original" / "tokenizer.model")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache_prompt")
    return save_llama3_tiny(root / "a"), save_llama3_tiny(root / "b", seed=1)


DOC = "The quick brown fox jumps over the lazy dog. " * 12


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli_main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def cached_count(err: str) -> int:
    m = re.search(r"prompt tokens \((\d+) cached\)", err)
    return int(m.group(1)) if m else 0


def test_generate_continues_a_cached_prompt(tiny, tmp_path, capsys):
    (tmp_path / "doc.txt").write_text(DOC)
    code, _, err = run(capsys, "cache-prompt", "-m", str(tiny[0]), "--file", str(tmp_path / "doc.txt"),
                       "-o", str(tmp_path / "doc.kv"))
    assert code == 0 and re.search(r"cached \d+ tokens of .*doc.txt in .* -> .*doc.kv", err)
    code, out, err = run(capsys, "generate", "-m", str(tiny[0]), "--prompt-cache", str(tmp_path / "doc.kv"),
                         "-p", " Summary:", "--max-tokens", "6", "--stats")
    assert code == 0
    llm = load(tiny[0])
    ids = llm.tokenizer.encode(DOC, add_bos=True)
    assert cached_count(err) == len(ids)
    expected = llm.generate(ids + llm.tokenizer.encode(" Summary:"), max_tokens=6, temperature=0)
    assert out == expected.text + "\n"


def test_chat_uses_a_cached_system_prompt(tiny, tmp_path, capsys):
    (tmp_path / "rules.txt").write_text("You answer in French. " * 10)
    kv = str(tmp_path / "rules.kv")
    assert run(capsys, "cache-prompt", "-m", str(tiny[0]), "--file", str(tmp_path / "rules.txt"), "--system",
               "--date", "26 Jul 2024", "-o", kv)[0] == 0
    code, out, err = run(capsys, "chat", "-m", str(tiny[0]), "--prompt-cache", kv, "--max-tokens", "4", "--stats",
                         "Bonjour?")
    assert code == 0 and cached_count(err) > 50  # the whole system block
    llm = load(tiny[0])
    expected = llm.chat([{"role": "system", "content": "You answer in French. " * 10},
                         {"role": "user", "content": "Bonjour?"}], date_string="26 Jul 2024", max_tokens=4,
                        temperature=0)
    assert out == expected["content"] + "\n"
    # a plain-text cache is no system prompt
    (tmp_path / "doc.txt").write_text(DOC)
    run(capsys, "cache-prompt", "-m", str(tiny[0]), "--file", str(tmp_path / "doc.txt"), "-o",
        str(tmp_path / "doc.kv"))
    code, _, err = run(capsys, "chat", "-m", str(tiny[0]), "--prompt-cache", str(tmp_path / "doc.kv"), "Hi")
    assert code == 2 and "holds a plain-text prefix; for chat, make one from the system prompt" in err


def test_a_cache_from_another_model_is_refused(tiny, tmp_path, capsys):
    (tmp_path / "doc.txt").write_text(DOC)
    run(capsys, "cache-prompt", "-m", str(tiny[0]), "--file", str(tmp_path / "doc.txt"), "-o",
        str(tmp_path / "a.kv"))
    code, _, err = run(capsys, "generate", "-m", str(tiny[1]), "--prompt-cache", str(tmp_path / "a.kv"), "-p", "x")
    assert code == 2
    assert "was made for another model (made with a): its model weights fingerprint differs" in err
    assert "Traceback" not in err


def test_cache_prompt_errors(tiny, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("  \n")
    code, _, err = run(capsys, "cache-prompt", "-m", str(tiny[0]), "--file", str(tmp_path / "empty.txt"),
                       "-o", str(tmp_path / "e.kv"))
    assert code == 2 and "empty.txt is empty: nothing to cache" in err
    code, _, err = run(capsys, "generate", "-m", str(tiny[0]), "--prompt-cache", str(tmp_path / "none.kv"),
                       "-p", "x")
    assert code == 2 and "none.kv does not exist; make one with `pocketllama cache-prompt" in err


def test_generate_with_draft_flags_prints_the_same_text(tiny, capsys):
    base = ["generate", "-m", str(tiny[0]), "-p", "Once upon a time", "--max-tokens", "12", "--stats"]
    code, plain, _ = run(capsys, *base)
    assert code == 0
    for flags in (["--draft-model", "self-int4"], ["--prompt-lookup"], ["--draft-model", str(tiny[1])]):
        code, out, err = run(capsys, *base, *flags)
        assert code == 0 and out == plain, flags
        assert re.search(r"draft: \d+/\d+ accepted \(\d+%\)", err), (flags, err)
    code, _, err = run(capsys, *base, "--prompt-lookup", "--draft-model", "self-int4")
    assert code == 2 and "--draft-model and --prompt-lookup are alternatives" in err


def test_load_refuses_a_draft_with_another_vocabulary(tiny, tmp_path):
    other = save_llama3_tiny(tmp_path / "v", vocab_size=128000)
    with pytest.raises(ValueError, match=r"draft model .*v has a vocabulary of 128000 tokens but .* has 128256; "
                                         r"speculative decoding needs the same tokenizer"):
        load(tiny[0], draft=other)
    with pytest.raises(TypeError, match="draft must be 'prompt-lookup', 'self-int4', a model source"):
        load(tiny[0], draft=3.5)


def test_llm_chat_reuses_the_conversation_prefix(tiny):
    llm = load(tiny[0])
    cold = load(tiny[0])
    cold.prompt_cache = False
    messages = [{"role": "user", "content": "Name three colors."}]
    kw = dict(date_string="26 Jul 2024", max_tokens=8, temperature=0)
    first = list(llm.stream_chat(messages, **kw))
    assert first[-1].cached_tokens == 0
    messages += [{"role": "assistant", "content": "".join(r.text for r in first)},
                 {"role": "user", "content": "And three more?"}]
    second = list(llm.stream_chat(messages, **kw))
    reference = list(cold.stream_chat(messages, **kw))
    assert second[-1].cached_tokens > first[-1].prompt_tokens - 2
    assert [r.token for r in second] == [r.token for r in reference]
    assert reference[-1].cached_tokens == 0
