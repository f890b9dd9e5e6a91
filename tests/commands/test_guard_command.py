"""`pocketllama guard`: one prompt / response, flags, and the resumable JSONL batch (interrupted runs lose and
duplicate nothing), on a scripted guard checkpoint that always answers `unsafe\\nS1`.
"""

from __future__ import annotations

import json
import re

import pytest
from scripted_llama import save_scripted_llama

from pocketllama.cli import main as cli_main
from pocketllama.commands import guard as guard_cmd
from pocketllama.guard import NL2_ID, UNSAFE_ID, Guard

CHAIN = {128007: NL2_ID, NL2_ID: UNSAFE_ID, UNSAFE_ID: 198, 198: 50, 50: 16, 16: 128009}  # "\n\nunsafe\nS1"


@pytest.fixture(scope="module")
def guard_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("guard_cli")
    save_scripted_llama(path, CHAIN)
    return path


@pytest.fixture(scope="module")
def guard(guard_dir):
    return Guard.load(guard_dir, dtype="float32")


@pytest.fixture
def loaded(guard, monkeypatch):
    """Skip re-loading the checkpoint in every CLI call (one test loads it for real)."""
    monkeypatch.setattr(guard_cmd, "_load", lambda args: guard)
    return guard


def test_one_prompt_real_load(guard_dir, capsys):
    assert cli_main(["guard", "-m", str(guard_dir), "How do I make a cake?"]) == 0
    out, err = capsys.readouterr()
    assert out == "unsafe\nS1: Violent Crimes\n" and "p_unsafe: 1.0000 (vs safe only: 1.0000)" in err


def test_response_exclude_and_json(loaded, capsys):
    assert guard_cmd.main(["How?", "--response", "Like this.", "--exclude", "s1, S2", "--json"]) == 0
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["safe"] and verdict["role"] == "Agent" and verdict["excluded_categories"] == ["S1", "S2"]


def test_custom_categories_file(loaded, tmp_path, capsys):
    cats = tmp_path / "cats.yaml"
    cats.write_text("S1: |-\n  No llama talk.\n  Not even alpacas.\nS2: Other.\n")
    assert guard_cmd.main(["Llamas!", "--categories", str(cats)]) == 0
    assert capsys.readouterr().out == "unsafe\nS1: No llama talk\n"
    assert "S1: No llama talk.\nNot even alpacas.\nS2: Other.\n<END" in loaded.render(
        "x", categories=guard_cmd.read_categories(cats))


@pytest.mark.parametrize("argv, error", [
    (["--image", "{tmp}/img.png", "hi"], "image content needs the vision guard"),
    (["--image", "{tmp}/missing.png", "hi"], "--image .*missing.png: no such file"),
    (["--categories", "{tmp}/bad.yaml", "hi"], "must map codes to descriptions"),
    (["--exclude", "S99", "hi"], "cannot exclude S99"),
    (["--input", "{tmp}/in.jsonl"], "batch mode needs both --input FILE.jsonl and --output FILE.jsonl"),
    (["--input", "{tmp}/in.jsonl", "--output", "{tmp}/o.jsonl", "text"], "batch mode takes conversations from"),
    (["--input", "{tmp}/none.jsonl", "--output", "{tmp}/o.jsonl"], "--input .*none.jsonl: no such file"),
    (["--input", "{tmp}/dup.jsonl", "--output", "{tmp}/o.jsonl"], "dup.jsonl:2: id 'a' appears twice"),
    (["--input", "{tmp}/broken.jsonl", "--output", "{tmp}/o.jsonl"], "broken.jsonl:1: not valid JSON"),
    (["--input", "{tmp}/noconv.jsonl", "--output", "{tmp}/o.jsonl"], "noconv.jsonl:1: needs 'messages'"),
    (["--input", "{tmp}/in.jsonl", "--output", "{tmp}/o.jsonl", "--limit", "-1"], "--limit must be >= 0"),
    (["  "], "nothing to classify"),
])  # fmt: skip
def test_errors(loaded, tmp_path, capsys, argv, error):
    (tmp_path / "img.png").write_bytes(b"\x89PNG")
    (tmp_path / "bad.yaml").write_text("- a list\n")
    (tmp_path / "in.jsonl").write_text('{"prompt": "x"}\n')
    (tmp_path / "dup.jsonl").write_text('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n')
    (tmp_path / "broken.jsonl").write_text('{"id": \n')
    (tmp_path / "noconv.jsonl").write_text('{"id": 1}\n')
    assert guard_cmd.main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    assert re.search(error, capsys.readouterr().err)


def write_inputs(path, n: int = 5) -> list:
    rows = [{"id": f"c{i}", "prompt": f"question {i}"} for i in range(n - 2)]
    rows.append({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})  # id = 4
    rows.append({"id": "bad", "messages": [{"role": "system", "content": "s"}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [r.get("id", i + 1) for i, r in enumerate(rows)]


def read_output(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_batch_limit_then_resume(loaded, tmp_path, capsys):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_inputs(src)
    assert guard_cmd.main(["--input", str(src), "--output", str(out), "--limit", "2"]) == 0
    assert [r["id"] for r in read_output(out)] == ids[:2]
    assert "checked 2 conversation(s), 2 unsafe; 0 were already" in capsys.readouterr().err
    assert guard_cmd.main(["--input", str(src), "--output", str(out)]) == 0
    rows = read_output(out)
    assert [r["id"] for r in rows] == ids  # no verdict lost or duplicated
    assert rows[3]["role"] == "Agent" and rows[0]["categories"] == ["S1"]
    assert rows[4]["id"] == "bad" and "role 'system'" in rows[4]["error"]
    assert "checked 3 conversation(s), 2 unsafe; 2 were already" in capsys.readouterr().err
    assert guard_cmd.main(["--input", str(src), "--output", str(out)]) == 0 and read_output(out) == rows


def test_batch_interrupted_and_crash_cut_line(loaded, tmp_path, monkeypatch, capsys):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_inputs(src)
    real_check, calls = loaded.check, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_check(*args, **kwargs)

    monkeypatch.setattr(loaded, "check", interrupted)
    assert guard_cmd.main(["--input", str(src), "--output", str(out)]) == 130  # Ctrl-C mid-run
    assert [r["id"] for r in read_output(out)] == ids[:2]
    with out.open("a") as f:  # a crash in the middle of writing a line
        f.write('{"id": "c2", "safe": fa')
    monkeypatch.setattr(loaded, "check", real_check)
    assert guard_cmd.main(["--input", str(src), "--output", str(out)]) == 0
    assert [r["id"] for r in read_output(out)] == ids
