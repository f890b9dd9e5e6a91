"""Supervised fine-tuning loop: LoRA, QLoRA (LoRA over an int4/int8 frozen base) or full fine-tuning, one
process or many under torchrun (DDP for LoRA, FSDP2 for full), with gradient accumulation, a warmup + cosine
/ linear schedule, eval loss every N steps, atomic checkpoints and an exact `resume`.

The loss of a step is the mean token cross-entropy over *every* target token of the global batch (all
micro-batches of all processes), so one process with batch B x accumulation A gives the same loss and
gradient as N processes with B x A / N each.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed as D
from . import state as S
from .data import IGNORE, Batch, Example, Row, collate, epoch_rows, load_examples, split_examples

Method = Literal["lora", "qlora", "full"]


@dataclass
class FinetuneConfig:
    """Every knob of a run (the CLI's flags map 1:1 onto these; see `pocketllama finetune --help`)."""

    data: str
    output: str
    model: str | None = None  # default: smollm2-135m
    method: Method = "lora"
    val_data: str | None = None
    val_fraction: float = 0.05
    # LoRA
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    targets: Any = "all-linear"  # list of module names, a regex over full names, or "all-linear"
    lora_layers: list[int] | None = None  # only these decoder layers (None: all)
    quantize: str | None = None  # QLoRA base recipe (default int4-g32; an already quantized model as stored)
    # data
    max_len: int = 1024
    too_long: str = "truncate"
    packing: bool = False
    bad_lines: str = "skip"
    raw_completions: bool = False
    date_string: str | None = None
    # optimisation
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 1
    grad_accum: int = 8
    lr: float | None = None  # default 2e-4 (LoRA / QLoRA), 2e-5 (full)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "cosine"
    warmup_steps: int | None = None
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    dtype: str | None = None  # "float32" | "bfloat16"; default: bfloat16 on a GPU, float32 on a CPU
    gradient_checkpointing: bool = False
    seed: int = 0
    # bookkeeping
    eval_every: int = 50
    save_every: int = 100
    save_total_limit: int | None = 2
    resume: bool = False
    device: str = "auto"
    threads: int | None = None
    progress: bool = True
    log_every: int = 1

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (2e-5 if self.method == "full" else 2e-4)

    def fingerprint(self) -> dict[str, Any]:
        keep = ("model", "method", "lora_r", "lora_alpha", "lora_dropout", "targets", "lora_layers", "quantize",
                "max_len", "too_long", "packing", "raw_completions", "date_string", "epochs", "max_steps",
                "weight_decay", "betas", "schedule", "warmup_steps", "warmup_ratio", "min_lr_ratio",
                "max_grad_norm", "dtype", "seed", "val_fraction")
        out = {k: _jsonable(getattr(self, k)) for k in keep}
        out.update(lr=self.learning_rate(), data=S.file_digest(self.data), val_data=S.file_digest(self.val_data))
        return out


def _jsonable(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


@dataclass
class FinetuneResult:
    output: Path
    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per optimizer step
    evals: list[dict[str, Any]] = field(default_factory=list)  # {"step", "eval_loss"}

    @property
    def losses(self) -> list[float]:
        return [r["loss"] for r in self.history]


class CausalLMLoss(nn.Module):
    """The model behind one forward that DDP / FSDP can wrap: batch -> summed token cross-entropy (fp32)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor, positions: torch.Tensor,
                attn_mask: torch.Tensor | None = None, images: Any = None) -> torch.Tensor:
        kwargs: dict[str, Any] = {}
        if attn_mask is not None:
            kwargs["attn_mask"] = attn_mask
        if images is not None:  # Llama 3.2 Vision: encode with gradients (cross-attention K/V may carry adapters)
            encode = type(self.model).encode_images.__wrapped__  # the method without its inference no_grad
            kwargs["vision"] = encode(self.model, images, input_ids)
        logits = self.model(input_ids, positions, **kwargs)  # (B, T, V)
        # no gather of the target rows: its backward would scatter into a fresh (B*T, V) fp32 buffer
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")


def enable_gradient_checkpointing(model: nn.Module) -> int:
    """Recompute each decoder layer's activations in the backward instead of storing them (the layer's
    `forward` is replaced on the instance; parameter names and the model file are untouched)."""
    from torch.utils.checkpoint import checkpoint

    n = 0
    for module in model.modules():
        if type(module).__name__.endswith("DecoderLayer") and not getattr(module, "_checkpointed", False):
            original = module.forward

            def forward(*args: Any, _f: Any = original, **kwargs: Any) -> Any:
                if torch.is_grad_enabled():
                    return checkpoint(_f, *args, use_reentrant=False, **kwargs)
                return _f(*args, **kwargs)

            module.forward = forward
            module._checkpointed = True
            n += 1
    return n


def lr_lambda(schedule: str, warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """Multiplier of the peak learning rate at optimizer step `s` (0-based): linear warmup, then cosine or
    linear decay to `min_ratio`, or constant."""
    if schedule not in ("cosine", "linear", "constant"):
        raise ValueError(f"schedule {schedule!r} is not one of cosine, linear, constant")

    def f(s: int) -> float:
        if s < warmup:
            return (s + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (s - warmup) / max(1, total - warmup))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
        return min_ratio + (1 - min_ratio) * decay

    return f


class StepPlan:
    """Which rows each optimizer step trains on: epochs of seeded-shuffled (optionally packed) rows cut into
    global batches of `global_rows`. Deterministic, so every process and every resume agree."""

    def __init__(self, examples: list[Example], cfg: FinetuneConfig, global_rows: int) -> None:
        self.examples, self.cfg, self.global_rows = examples, cfg, global_rows
        self._epochs: list[list[Row]] = []
        if cfg.max_steps is not None:
            self.total = cfg.max_steps
        else:
            self.total = sum(math.ceil(len(self.rows(e)) / global_rows) for e in range(cfg.epochs))

    def rows(self, epoch: int) -> list[Row]:
        while len(self._epochs) <= epoch:
            self._epochs.append(epoch_rows(self.examples, len(self._epochs), self.cfg.seed,
                                           packing=self.cfg.packing, max_len=self.cfg.max_len))
        return self._epochs[epoch]

    def step(self, s: int) -> tuple[int, list[Row]]:
        """(epoch, rows) of optimizer step `s`."""
        epoch = 0
        while True:
            n = math.ceil(len(self.rows(epoch)) / self.global_rows)
            if s < n:
                return epoch, self.rows(epoch)[s * self.global_rows:(s + 1) * self.global_rows]
            s -= n
            epoch += 1


def finetune(cfg: FinetuneConfig, *, on_step: Callable[[dict[str, Any]], None] | None = None,
             log: Callable[[str], None] | None = None) -> FinetuneResult:
    """Run a fine-tuning job; returns the loss history. `on_step(record)` is called after every optimizer
    step (tests use it to interrupt a run); `log` receives the human-readable report lines (default: print
    on rank 0)."""
    info = D.init_distributed(cfg.device)
    try:
        return _Run(cfg, info, on_step, log).run()
    finally:
        info.close()


class _Run:
    def __init__(self, cfg: FinetuneConfig, info: D.DistInfo, on_step: Callable | None,
                 log: Callable[[str], None] | None) -> None:
        self.cfg, self.info, self.on_step = cfg, info, on_step
        self.out = Path(cfg.output)
        self._log = log or print

    def say(self, text: str) -> None:
        if self.info.is_main:
            if self.bar is not None:
                self.bar.write(text)
            else:
                self._log(text)

    bar: Any = None

    # ---- setup -------------------------------------------------------------------------------------

    def run(self) -> FinetuneResult:
        cfg, info = self.cfg, self.info
        if cfg.method not in ("lora", "qlora", "full"):
            raise ValueError(f"method {cfg.method!r} is not one of lora, qlora, full")
        if cfg.batch_size < 1 or cfg.grad_accum < 1:
            raise ValueError("batch_size and grad_accum must be >= 1")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed + info.rank)
        resume_from = self._resume_point()
        llm = self._load()
        self.llm = llm
        train, val = self._data(llm)
        model = llm.model
        self._prepare(model)
        self.module = D.wrap(CausalLMLoss(model), info, sharded=cfg.method == "full",
                             layers=[m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")],
                             find_unused=getattr(model, "accepts_images", False))
        params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate(), betas=tuple(cfg.betas),
                                           weight_decay=cfg.weight_decay)
        global_rows = cfg.batch_size * cfg.grad_accum * info.world_size
        self.plan = StepPlan(train, cfg, global_rows)
        total = self.plan.total
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * total)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.schedule, warmup, total, cfg.min_lr_ratio))
        self.val = val
        self.pad_id = next((i for i in (llm.tokenizer.pad_id, llm.tokenizer.eos_id) if i is not None), 0)
        history: list[dict[str, Any]] = []
        evals: list[dict[str, Any]] = []
        start = 0
        if resume_from is not None:
            start, history, evals = self._restore(resume_from, global_rows)
        trainable, total_params = _count(model)
        self.say(f"{cfg.method}: training {trainable:,} of {total_params:,} parameters; {len(train)} train / "
                 f"{len(val)} validation examples; {total} steps of {global_rows} rows "
                 f"({cfg.batch_size} x {cfg.grad_accum} accumulation x {info.world_size} process(es))")
        if start:
            self.say(f"resumed from {resume_from} at step {start}")
        self._train(start, total, history, evals)
        self._save_final()
        return FinetuneResult(self.out, total, history, evals)

    def _load(self):
        from ..llm import load

        cfg = self.cfg
        quantize: Any = False
        if cfg.method == "qlora":
            quantize = cfg.quantize or _qlora_default(cfg.model)
        dtype = cfg.dtype or ("bfloat16" if self.info.device.type == "cuda" else "float32")
        llm = load(cfg.model, dtype=dtype, device=self.info.device, quantize=quantize, progress=False)
        llm.prompt_cache = False
        return llm

    def _data(self, llm) -> tuple[list[Example], list[Example]]:
        cfg = self.cfg
        kw = dict(max_len=cfg.max_len, too_long=cfg.too_long, on_error=cfg.bad_lines, date_string=cfg.date_string,
                  raw_completions=cfg.raw_completions,
                  image_token_id=getattr(llm.config, "image_token_index", None))
        examples, report = load_examples(cfg.data, llm.tokenizer, llm.chat_format, **kw)
        self.say(report.summary())
        reports = [report.to_dict()]
        if cfg.val_data:
            val, vreport = load_examples(cfg.val_data, llm.tokenizer, llm.chat_format, **kw)
            self.say(vreport.summary())
            reports.append(vreport.to_dict())
            train = examples
        else:
            train, val = split_examples(examples, cfg.val_fraction, cfg.seed)
        if cfg.packing and any(ex.image is not None for ex in train + val):
            raise ValueError("packing is not supported with images; train vision examples unpacked (no --packing)")
        if self.info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "data_report.json").write_text(json.dumps(reports, indent=2) + "\n")
        return train, val

    def _prepare(self, model: nn.Module) -> None:
        from .lora import apply_lora, full_finetune_params

        cfg = self.cfg
        if cfg.method == "full":
            full_finetune_params(model)
        else:
            apply_lora(model, cfg.targets, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                       layers=cfg.lora_layers)
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        model.to(self.info.device)
        model.train()

    # ---- the loop ----------------------------------------------------------------------------------

    def _train(self, start: int, total: int, history: list[dict[str, Any]], evals: list[dict[str, Any]]) -> None:
        cfg, info = self.cfg, self.info
        self.history, self.evals = history, evals
        if cfg.progress and info.is_main:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="finetune", unit="step", dynamic_ncols=True)
        log_path = self.out / "log.jsonl"
        try:
            if start == 0 and self.val:
                self._evaluate(0)  # the starting point of the validation curve
            for step in range(start, total):
                record = self._step(step)
                history.append(record)
                if info.is_main:
                    with open(log_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
                if self.bar is not None:
                    self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                         tok_s=f"{record['tokens_per_s']:.0f}")
                    self.bar.update(1)
                done = step + 1
                if done == total or (cfg.eval_every and done % cfg.eval_every == 0):
                    self._evaluate(done)
                if cfg.save_every and done % cfg.save_every == 0 and done < total:
                    self._checkpoint(done)
                if self.on_step is not None:
                    self.on_step(record)
        finally:
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    def _step(self, step: int) -> dict[str, Any]:
        cfg, info = self.cfg, self.info
        t0 = time.perf_counter()
        epoch, rows = self.plan.step(step)
        n_targets = sum(ex.num_targets for row in rows for ex in row)  # global: every rank sees every row
        mine = rows[info.rank::info.world_size]
        micro = [mine[i * cfg.batch_size:(i + 1) * cfg.batch_size] for i in range(cfg.grad_accum)]
        loss_sum, tokens = 0.0, 0
        for i, part in enumerate(micro):
            batch = self._batch(part)
            with D.set_gradient_sync(self.module, i == len(micro) - 1):
                loss = self._forward(batch)
                # every process scales by world / global targets: DDP / FSDP average the gradients over ranks
                (loss * (info.world_size / max(n_targets, 1))).backward()
            loss_sum += float(loss.detach())
            tokens += batch.num_tokens
        grad_norm = None
        if cfg.max_grad_norm:
            norm = torch.nn.utils.clip_grad_norm_([p for p in self.module.parameters() if p.requires_grad],
                                                  cfg.max_grad_norm)
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, tokens = D.all_reduce_sum([loss_sum, float(tokens)], info)
        seconds = time.perf_counter() - t0
        record = {"step": step + 1, "epoch": epoch, "loss": loss_sum / max(n_targets, 1), "lr": lr,
                  "targets": n_targets, "tokens": int(tokens), "tokens_per_s": tokens / max(seconds, 1e-9),
                  "seconds": seconds}
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        return record

    def _batch(self, rows: list[Row]) -> Batch:
        if rows:
            return collate(rows, self.pad_id).to(self.info.device)
        # This rank has no row left in a short last step: a 1-token row without a target keeps the
        # collectives of DDP / FSDP in step with the other ranks and adds nothing.
        batch = collate([[Example([self.pad_id], [False], 0)]], self.pad_id)
        batch.num_tokens = 0
        return batch.to(self.info.device)

    def _forward(self, batch: Batch) -> torch.Tensor:
        images = None
        if batch.images is not None:
            from ..vision import image_processor

            images = image_processor(self.llm.model, self.llm.source)([[img] for img in batch.images])
        return self.module(batch.input_ids, batch.targets, batch.positions, batch.attn_mask, images)

    @torch.no_grad()
    def _evaluate(self, step: int) -> float | None:
        if not self.val:
            return None
        cfg, info = self.cfg, self.info
        self.module.eval()
        loss_sum, n = 0.0, 0
        mine = [[ex] for ex in self.val][info.rank::info.world_size]
        batches = [mine[i:i + cfg.batch_size] for i in range(0, len(mine), cfg.batch_size)]
        most = max(1, math.ceil(len(self.val) / info.world_size / cfg.batch_size))
        for i in range(most):  # the same number of forwards on every rank (FSDP gathers layer weights)
            part = batches[i] if i < len(batches) else []
            batch = self._batch(part)
            loss_sum += float(self._forward(batch))
            n += batch.num_targets
        self.module.train()
        loss_sum, n = D.all_reduce_sum([loss_sum, float(n)], info)
        value = loss_sum / max(n, 1)
        self.evals.append({"step": step, "eval_loss": value})
        self.say(f"step {step}: eval loss {value:.4f} ({int(n)} tokens)")
        if info.is_main:
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "eval_loss": value}) + "\n")
        return value

    # ---- saving and resuming -----------------------------------------------------------------------

    def _weights(self) -> tuple[str, dict[str, torch.Tensor]]:
        """("adapter" | "model", tensors to save); collective under FSDP (call on every rank)."""
        from .peft_format import adapter_state_dict

        model = self.llm.model
        if self.cfg.method != "full":
            return "adapter", adapter_state_dict(model)
        state = D.full_model_state(self.module)
        return "model", {k.removeprefix("model."): v for k, v in state.items()}

    def _write_weights(self, folder: Path, kind: str, tensors: dict[str, torch.Tensor]) -> None:
        from ..weights.safetensors import save_safetensors
        from .peft_format import save_adapter

        if kind == "adapter":
            save_adapter(self.llm.model, folder, base_model=self.cfg.model or "smollm2-135m",
                         dropout=self.cfg.lora_dropout, state=tensors)
            return
        config = self.llm.config
        if self.llm.config.tie_word_embeddings:
            tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
        save_safetensors(tensors, folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps(config.to_hf(), indent=2) + "\n")

    def _checkpoint(self, step: int) -> None:
        kind, tensors = self._weights()
        optim = D.full_optimizer_state(self.module, self.optimizer)
        rngs = D.all_gather_object(S.rng_state(), self.info)
        if self.info.is_main:
            state = {"step": step, "optimizer": optim, "scheduler": self.scheduler.state_dict(), "rng": rngs,
                     "history": self.history, "evals": self.evals, "fingerprint": self.cfg.fingerprint(),
                     "global_rows": self.plan.global_rows, "kind": kind}

            def write(folder: Path) -> None:
                self._write_weights(folder, kind, tensors)
                S.save_state(folder, state)

            path = S.write_checkpoint(self.out, step, write, self.cfg.save_total_limit)
            self.say(f"step {step}: checkpoint {path}")
        D.barrier(self.info)

    def _resume_point(self) -> Path | None:
        if not self.cfg.resume:
            return None
        if self.info.is_main:
            S.remove_partial(self.out)
        found = S.latest_checkpoint(self.out)
        if found is None:
            raise FileNotFoundError(f"nothing to resume: {S.checkpoints_dir(self.out)} has no complete checkpoint; "
                                    "run without --resume to start")
        return found

    def _restore(self, folder: Path, global_rows: int) -> tuple[int, list[dict], list[dict]]:
        from safetensors.torch import load_file

        state = S.load_state(folder)
        S.check_fingerprint(state["fingerprint"], self.cfg.fingerprint(), folder)
        if state["global_rows"] != global_rows:
            raise ValueError(f"cannot resume from {folder}: it trained {state['global_rows']} rows per step, this "
                             f"run {global_rows} (batch_size x grad_accum x processes); keep the global batch")
        model = self.llm.model
        if state["kind"] == "adapter":
            from .lora import lora_modules
            from .peft_format import PREFIX, WEIGHTS_FILE

            tensors = load_file(str(folder / WEIGHTS_FILE))
            with torch.no_grad():
                for name, m in lora_modules(model).items():
                    m.lora_A.weight.copy_(tensors[f"{PREFIX}{name}.lora_A.weight"])
                    m.lora_B.weight.copy_(tensors[f"{PREFIX}{name}.lora_B.weight"])
        else:
            tensors = load_file(str(folder / "model.safetensors"))
            if self.llm.config.tie_word_embeddings:
                tensors.pop("lm_head.weight", None)
            if D.is_sharded(self.module):
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

                set_model_state_dict(self.module, {f"model.{k}": v for k, v in tensors.items()},
                                     options=StateDictOptions(full_state_dict=True))
            else:
                with torch.no_grad():
                    for k, p in model.state_dict().items():
                        if k in tensors:
                            p.copy_(tensors[k])
        D.load_optimizer_state(self.module, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        rngs = state["rng"]
        if len(rngs) == self.info.world_size:
            S.set_rng_state(rngs[self.info.rank])
        if self.info.is_main:  # the log of the interrupted run ends at its last checkpoint
            log = self.out / "log.jsonl"
            keep = [json.dumps(r) for r in _merge_log(state["history"], state["evals"])]
            log.write_text("".join(line + "\n" for line in keep))
        return state["step"], list(state["history"]), list(state["evals"])

    def _save_final(self) -> None:
        kind, tensors = self._weights()
        if self.info.is_main:
            self._write_weights(self.out, kind, tensors)
            if kind == "model":
                from ..quant.save import copy_tokenizer
                from ..sources import resolve
                from ..weights import open_checkpoint

                copy_tokenizer(open_checkpoint(resolve(self.cfg.model)), self.out)
            (self.out / "finetune_config.json").write_text(json.dumps(asdict(self.cfg), indent=2, default=str) + "\n")
            self.say(f"saved the {'adapter' if kind == 'adapter' else 'model'} to {self.out}")
        D.barrier(self.info)


def _merge_log(history: list[dict], evals: list[dict]) -> list[dict]:
    out: list[dict] = []
    by_step = {e["step"]: e for e in evals}
    for r in history:
        out.append(r)
        if r["step"] in by_step:
            out.append(by_step[r["step"]])
    return out


def _count(model: nn.Module) -> tuple[int, int]:
    from .lora import trainable_summary

    return trainable_summary(model)


def _qlora_default(source: str | None) -> Any:
    """QLoRA's base: an already quantized checkpoint as stored, else float weights quantized to int4-g32."""
    from ..models import config_from_hf
    from ..quant.handler import plan_for_gguf
    from ..sources import resolve
    from ..weights import open_checkpoint

    checkpoint = open_checkpoint(resolve(source))
    config = getattr(checkpoint, "config", None) or config_from_hf(checkpoint.hf_config())
    if config.quantization:
        return None
    if hasattr(checkpoint, "raw_tensor") and hasattr(checkpoint, "tensor_type") and plan_for_gguf(checkpoint):
        return None
    return "int4-g32"
