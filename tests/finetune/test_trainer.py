"""finetune/trainer.py on a tiny Llama 3 checkpoint: exact resume after an interruption, gradient accumulation
equal to a bigger batch, 2 processes (gloo, torchrun) equal to 1, QLoRA, full fine-tuning, packing, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ft_fixtures import chat, one_thread, save_tiny_llama3, write_jsonl  # noqa: F401

from pocketllama.finetune.trainer import FinetuneConfig, finetune, lr_lambda

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    save_tiny_llama3(root / "base")
    # answers of different lengths: a per-example mean would weight them differently than the token mean
    records = [chat(f"What is {i} + {i}?", "Arr! " + " ".join(["It be"] * (1 + i % 4)) + f" {2 * i}.")
               for i in range(24)]
    write_jsonl(root / "train.jsonl", records)
    return root


def config(setup: Path, out: str, **kw) -> FinetuneConfig:
    base = dict(data=str(setup / "train.jsonl"), output=str(setup / out), model=str(setup / "base"), max_steps=4,
                batch_size=2, grad_accum=2, lr=5e-3, lora_r=4, lora_alpha=8, lora_dropout=0.0, eval_every=2,
                save_every=0, progress=False, date_string="26 Jul 2024", val_fraction=0.15)
    base.update(kw)
    return FinetuneConfig(**base)


def quiet(_: str) -> None:
    pass


def test_resume_reproduces_the_uninterrupted_run(setup):
    kw = dict(max_steps=6, save_every=2, lora_dropout=0.1)  # dropout: the RNG state must be restored too
    full = finetune(config(setup, "whole", **kw), log=quiet)

    def crash(record):
        if record["step"] == 5:  # killed after step 5; the newest checkpoint is step 4
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(config(setup, "killed", **kw), on_step=crash, log=quiet)
    out = setup / "killed"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    (out / "checkpoints" / ".tmp-step-000006").mkdir()  # a save interrupted half-way is ignored
    resumed = finetune(config(setup, "killed", resume=True, **kw), log=quiet)
    assert len(resumed.losses) == 6
    torch.testing.assert_close(resumed.losses, full.losses, rtol=1e-6, atol=0)
    assert [e["step"] for e in resumed.evals] == [0, 2, 4, 6]
    torch.testing.assert_close([e["eval_loss"] for e in resumed.evals], [e["eval_loss"] for e in full.evals])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4, 5, 6]  # no duplicate step 5
    from safetensors.torch import load_file

    a, b = (load_file(str(setup / d / "adapter_model.safetensors")) for d in ("whole", "killed"))
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    assert not (out / "checkpoints" / ".tmp-step-000006").exists()


def test_resume_errors(setup):
    with pytest.raises(FileNotFoundError, match="nothing to resume: .*has no complete checkpoint"):
        finetune(config(setup, "never", resume=True), log=quiet)
    finetune(config(setup, "changed", max_steps=2, save_every=1), log=quiet)
    with pytest.raises(ValueError, match="differs from the checkpointed one \\(lr: checkpoint 0.005 vs now 0.001\\)"):
        finetune(config(setup, "changed", max_steps=2, save_every=1, lr=1e-3, resume=True), log=quiet)
    with pytest.raises(ValueError, match="it trained 4 rows per step, this run 2"):
        finetune(config(setup, "changed", max_steps=2, save_every=1, grad_accum=1, resume=True), log=quiet)


def test_accumulation_equals_a_bigger_batch(setup):
    """The loss is the token mean over the whole global batch, however it is split into micro-batches."""
    runs = [finetune(config(setup, f"acc{b}", batch_size=b, grad_accum=4 // b, max_steps=3, eval_every=0), log=quiet)
            for b in (4, 1)]
    torch.testing.assert_close(runs[0].losses, runs[1].losses, rtol=1e-5, atol=0)
    assert runs[0].history[0]["targets"] == runs[1].history[0]["targets"]


def _torchrun(setup: Path, out: str, *args: str) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "pocketllama", "finetune", "-m", str(setup / "base"), "--data", str(setup / "train.jsonl"),
           "-o", str(setup / out), "--max-steps", "3", "--batch-size", "1", "--grad-accum", "2", "--lr", "5e-3",
           "-r", "4", "--lora-alpha", "8", "--lora-dropout", "0", "--eval-every", "0", "--save-every", "0",
           "--val-fraction", "0.15", "--date", "26 Jul 2024", "--no-progress", "--threads", "1", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done: 3 steps") == 1  # rank 0 reports, rank 1 stays quiet
    return [json.loads(line) for line in (setup / out / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_two_processes_equal_one(setup, method):
    """torchrun, 2 CPU processes (gloo; DDP for LoRA, FSDP2 for full) x batch 1 x accumulation 2 == 1 process
    x batch 2 x accumulation 2. The same rows and the same token-mean loss; only summation orders differ (the
    per-rank loss sums, the gradient all-reduce: fp32 rounding, 1.1e-7 relative observed over 3 steps for both
    DDP and FSDP2). rtol 1e-4 leaves room for other CPUs' kernels while a rank that trained on other rows, a
    missing gradient all-reduce or a per-rank loss normalisation moves these losses by far more."""
    lr = "5e-3" if method == "lora" else "1e-3"
    two = _torchrun(setup, f"ddp-{method}", "--method", method, "--lr", lr)
    one = finetune(config(setup, f"one-{method}", method=method, max_steps=3, eval_every=0, lr=float(lr)), log=quiet)
    losses = [r["loss"] for r in two if "loss" in r]
    assert len(losses) == 3 and losses[-1] < losses[0]
    torch.testing.assert_close(losses, one.losses, rtol=1e-4, atol=0)
    eval_two = [r["eval_loss"] for r in two if "eval_loss" in r]
    torch.testing.assert_close(eval_two, [e["eval_loss"] for e in one.evals], rtol=1e-4, atol=0)
    if method == "full":  # rank 0 gathered the sharded weights into one loadable checkpoint
        from pocketllama.llm import load_model

        a, _ = load_model(setup / "ddp-full", dtype="float32")
        b, _ = load_model(setup / "one-full", dtype="float32")
        ids = torch.tensor([[128000, 791, 4320, 374]])
        with torch.no_grad():
            torch.testing.assert_close(a(ids), b(ids), rtol=1e-3, atol=1e-4)


def test_bf16_qlora_trains_and_its_adapter_fits_the_float_base(setup):
    from pocketllama.finetune.peft_format import load_adapter
    from pocketllama.llm import load_model

    result = finetune(config(setup, "qlora", method="qlora", max_steps=4, lr=1e-2, dtype="bfloat16"), log=quiet)
    assert result.evals[-1]["eval_loss"] < result.evals[0]["eval_loss"]
    model, _ = load_model(setup / "base", dtype="float32")
    assert len(load_adapter(model, setup / "qlora")) == 14


def test_full_finetuning_writes_a_loadable_checkpoint(setup):
    import pocketllama

    result = finetune(config(setup, "full", method="full", max_steps=3, lr=1e-3), log=quiet)
    assert result.evals[-1]["eval_loss"] < result.evals[0]["eval_loss"]
    tuned = pocketllama.load(setup / "full", dtype="float32")
    base = pocketllama.load(setup / "base", dtype="float32")
    assert tuned.tokenizer.vocab_size == base.tokenizer.vocab_size
    ids = torch.tensor([[128000, 791, 4320, 374]])
    with torch.no_grad():
        assert (tuned.model(ids) - base.model(ids)).abs().max() > 1e-3


def test_packing_and_gradient_checkpointing_run(setup):
    result = finetune(config(setup, "packed", packing=True, max_len=256, max_steps=2, batch_size=1, grad_accum=1,
                             gradient_checkpointing=True), log=quiet)
    assert result.history[0]["targets"] > 40  # ~5 examples (<= 17 targets each) in the packed row of step 1
    assert all(torch.isfinite(torch.tensor(result.losses)))


def test_schedule_shapes():
    cos = lr_lambda("cosine", 2, 10, 0.1)
    assert [round(cos(s), 3) for s in (0, 1, 2, 6, 10)] == [0.333, 0.667, 1.0, 0.55, 0.1]
    lin = lr_lambda("linear", 0, 4, 0.0)
    assert [lin(s) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    with pytest.raises(ValueError, match="schedule 'step' is not one of cosine, linear, constant"):
        lr_lambda("step", 0, 4, 0.0)


def test_config_errors(setup):
    with pytest.raises(ValueError, match="method 'prefix' is not one of lora, qlora, full"):
        finetune(config(setup, "bad", method="prefix"), log=quiet)
    with pytest.raises(ValueError, match="batch_size and grad_accum must be >= 1"):
        finetune(config(setup, "bad", grad_accum=0), log=quiet)


def test_epochs_with_a_short_last_step(setup):
    """20 training rows in global batches of 6: the 4th step has 2 rows, so its 2nd micro-batch is empty and
    runs a target-free placeholder row (what keeps ranks in step under DDP / FSDP); it adds no loss."""
    result = finetune(config(setup, "epoch", max_steps=None, epochs=1, batch_size=3, grad_accum=2, eval_every=0),
                      log=quiet)
    assert result.steps == 4 and [r["epoch"] for r in result.history] == [0, 0, 0, 0]
    from pocketllama.finetune.trainer import StepPlan

    train, cfg = _train_examples(setup)
    _, rows = StepPlan(train, cfg, global_rows=6).step(3)
    assert len(rows) == 2
    assert result.history[3]["targets"] == sum(ex.num_targets for row in rows for ex in row)
    assert sum(r["targets"] for r in result.history) == sum(ex.num_targets for ex in train)
    assert all(torch.isfinite(torch.tensor(result.losses)))


def _train_examples(setup: Path):
    import pocketllama
    from pocketllama.finetune.data import load_examples, split_examples

    cfg = config(setup, "epoch", max_steps=None, epochs=1)
    llm = pocketllama.load(cfg.model)
    examples, _ = load_examples(cfg.data, llm.tokenizer, llm.chat_format, max_len=cfg.max_len,
                                date_string=cfg.date_string)
    return split_examples(examples, cfg.val_fraction, cfg.seed)[0], cfg
