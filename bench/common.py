"""Shared bench helpers: real-shaped random checkpoints, subprocess timing, tables and JSON results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
CACHE = ROOT / ".cache"

# SPEC 1.1: Llama-3.2-1B (HF config.json values).
LLAMA_32_1B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048,
    "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 64, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
    "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False, "hidden_act": "silu",
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "torch_dtype": "bfloat16",
}
LLAMA_32_3B = {**LLAMA_32_1B, "hidden_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 24,
               "head_dim": 128}


def llama3_tokenizer_model() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.origin:
        raise SystemExit("bench needs the llama-models package for the Llama 3 tokenizer (pip install llama-models)")
    return Path(spec.origin).parent / "llama3" / "tokenizer.model"


def random_checkpoint(name: str = "llama-3.2-1b", config: dict[str, Any] | None = None) -> Path:
    """A Llama-3.2-shaped HF folder with random bf16 weights and the real Llama 3 tokenizer (made once)."""
    import shutil

    import torch
    from safetensors.torch import save_file

    from pocketllama.config import TextConfig
    from pocketllama.models.llama import LlamaForCausalLM

    config = config or LLAMA_32_1B
    path = CACHE / name
    if (path / "model.safetensors").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    cfg = TextConfig.from_hf(config)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    state = {}
    for k, shape in shapes.items():
        if k.endswith("norm.weight"):
            state[k] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            state[k] = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    save_file(state, str(path / "model.safetensors.tmp"), metadata={"format": "pt"})
    os.replace(path / "model.safetensors.tmp", path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copy(llama3_tokenizer_model(), path / "tokenizer.model")
    return path


def run_json(code: str, *args: str, env: dict[str, str] | None = None, timeout: float = 1800) -> dict[str, Any]:
    """Run `code` in a fresh interpreter (clean RSS, no shared warm state); it prints one JSON line last."""
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, **(env or {})})
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1][:300]}
    return json.loads(out.stdout.strip().splitlines()[-1])


RSS_HELPERS = '''
import json, resource, sys, time
def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
def peak_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
def reset_peak():
    open("/proc/self/clear_refs", "w").write("5")
'''


SERVE = '''
def serve(measure):
    """Stay loaded: answer each "run" line on stdin with one JSON line (bench/common.py Worker)."""
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "run":
            print(json.dumps(measure()), flush=True)
'''


class Worker:
    """An engine loaded once in its own interpreter (`code` ends by calling `serve(measure)` from SERVE);
    `run()` measures once more. Rounds of several workers then run seconds apart instead of a model load
    apart, so the machine's drifting memory bandwidth hits the engines alike."""

    def __init__(self, code: str, *args: str, env: dict[str, str] | None = None) -> None:
        import tempfile

        self.log = tempfile.TemporaryFile(mode="w+")  # stderr (progress bars) must not fill a pipe
        self.proc = subprocess.Popen([sys.executable, "-c", SERVE + code, *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env={**os.environ, **(env or {})})
        self.error = None if self._read() == "ready" else self._failure()

    def _read(self) -> str | None:
        """The next line that is "ready" or a JSON object (libraries may print other lines)."""
        for line in self.proc.stdout:
            line = line.strip()
            if line == "ready" or line.startswith("{"):
                return line
        return None

    def _failure(self) -> str:
        self.log.seek(0)
        return ((self.log.read().strip().splitlines() or ["failed"])[-1])[:300]

    def run(self) -> dict[str, Any]:
        if self.error is None:
            try:
                self.proc.stdin.write("run\n")
                self.proc.stdin.flush()
                line = self._read()
                if line is not None:
                    return json.loads(line)
            except (BrokenPipeError, json.JSONDecodeError):
                pass
            self.error = self._failure()
        return {"error": self.error}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def save(name: str, rows: list[dict[str, Any]], meta: dict[str, Any] | None = None) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    env = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "threads": os.environ.get("BENCH_THREADS"),
           "loadavg": os.getloadavg()[0], **(meta or {})}
    path.write_text(json.dumps({"meta": env, "rows": rows}, indent=2))
    return path


def has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
