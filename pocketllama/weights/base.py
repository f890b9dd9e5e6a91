"""The `Checkpoint` protocol every weight source implements, and the one loader that builds a model from it.

The model is built on the meta device and each parameter is assigned a tensor straight from the source
(memory-mapped where the dtype allows), so loading never holds two copies of the weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from ..tokenizer import Tokenizer


class Checkpoint(Protocol):
    path: Path
    native_dtype: torch.dtype

    def hf_config(self) -> dict[str, Any]: ...
    def tensor_names(self) -> list[str]: ...
    def tensor_shape(self, name: str) -> tuple[int, ...]: ...
    def load_tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor: ...
    def load_tokenizer(self) -> Tokenizer: ...
    def generation_config(self) -> dict[str, Any]: ...
    def chat_template(self) -> str | None: ...


class WeightsMismatchError(ValueError):
    """The checkpoint's tensors do not fit the model built from its config."""


def check_tensors(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], source: Path) -> None:
    """Raise one error listing every missing, unexpected and mis-shaped tensor."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = sorted(
        f"{k}: checkpoint {tuple(found[k])} vs model {tuple(expected[k])}"
        for k in set(expected) & set(found) if tuple(found[k]) != tuple(expected[k]))
    if not (missing or unexpected or misshaped):
        return
    lines = [f"checkpoint {source} does not match the model built from its config:"]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
        if items:
            shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
            lines.append(f"  {title} ({len(items)}): " + ", ".join(shown))
    raise WeightsMismatchError("\n".join(lines))


def build_on_meta(cls: type[nn.Module], config: Any) -> nn.Module:
    with torch.device("meta"):
        return cls(config)


def assign_weights(model: nn.Module, checkpoint: Checkpoint, dtype: torch.dtype,
                   device: torch.device | str = "cpu", progress: bool = False,
                   ignore: set[str] = frozenset()) -> None:
    """Assign every parameter of `model` (built on meta) from `checkpoint`, converting to `dtype`."""
    reference = model.state_dict()
    expected = {k: tuple(v.shape) for k, v in reference.items()}
    names = [n for n in checkpoint.tensor_names() if n not in ignore]
    check_tensors(expected, {n: tuple(checkpoint.tensor_shape(n)) for n in names}, checkpoint.path)
    # Module by module: as soon as a module's tensors are all read it takes them (and may repack them into a
    # kernel layout), so the checkpoint-layout copies never pile up beside the model (peak = model + module).
    owner = {n: n.rpartition(".")[0] for n in reference}
    waiting: dict[str, set[str]] = {}
    for n, m in owner.items():
        waiting.setdefault(m, set()).add(n)
    state: dict[str, torch.Tensor] = {}
    iterator = names
    if progress:
        from tqdm import tqdm

        iterator = tqdm(names, desc=f"loading {checkpoint.path.name}", unit="tensor", leave=False)
    for name in iterator:
        # quantized buffers (int8 / uint8, quant/) load as stored; only floating tensors convert to `dtype`
        t = checkpoint.load_tensor(name, dtype if reference[name].is_floating_point() else None)
        if t.device != torch.device(device):
            t = t.to(device)
        state[name] = t
        module = owner[name]
        waiting[module].discard(name)
        if not waiting[module]:
            prefix = module + "." if module else ""
            part = {n[len(prefix):]: state.pop(n) for n in [k for k in state if owner[k] == module]}
            model.get_submodule(module).load_state_dict(part, strict=False, assign=True)
    if state:  # not reached for a complete checkpoint (check_tensors above)
        model.load_state_dict(state, strict=False, assign=True)
    for module in model.modules():  # non-persistent buffers (rotary frequencies) were built on the CPU
        for key, buf in list(module._buffers.items()):
            if buf is not None and buf.device != torch.device(device):
                module._buffers[key] = buf.to(device)
