"""torch.distributed for fine-tuning: the process group from torchrun's environment (gloo on CPU, NCCL on GPU),
DDP for LoRA, FSDP2 (`fully_shard`) for full fine-tuning, full state dicts gathered for rank-0 saving.

One process (no torchrun) is world size 1: every helper here is then a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # we initialised the process group, so we tear it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT); one
    process without those variables runs alone. device "auto": this rank's GPU when CUDA is there, else CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() if device == "auto" else str(device).startswith("cuda")
    if cuda:
        dev = torch.device("cuda", local) if world > 1 or device in ("auto", "cuda") else torch.device(device)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu" if device == "auto" else device)
    if world == 1:
        return DistInfo(device=dev)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world,
                                device_id=dev if dev.type == "cuda" else None)
        owns = True
    return DistInfo(rank, world, local, dev, owns)


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    """Sum a few floats over every rank (float64, so token counts and loss sums stay exact)."""
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_object(obj: Any, info: DistInfo) -> list[Any]:
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's `obj` on every rank (e.g. a decision or an error message)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def wrap(module: nn.Module, info: DistInfo, *, sharded: bool, layers: list[nn.Module],
         find_unused: bool = False) -> nn.Module:
    """DDP (replicated: LoRA, where only the adapters are synchronised) or FSDP2 (every decoder layer, then the
    root, fully sharded: full fine-tuning). One process: `module` unchanged."""
    if not info.enabled:
        return module
    if sharded:
        from torch.distributed.fsdp import fully_shard

        for layer in layers:
            fully_shard(layer)
        fully_shard(module)
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(module, device_ids=ids, find_unused_parameters=find_unused)


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def full_model_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state dict on CPU: on rank 0 for a sharded module (collective: call on every
    rank; others get {}), the plain state dict otherwise."""
    if is_sharded(module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    if is_sharded(module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(module, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    if is_sharded(module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=True))
        return
    optimizer.load_state_dict(state)


def set_gradient_sync(module: nn.Module, enabled: bool) -> Any:
    """Context for one micro-batch: DDP's `no_sync` / FSDP2's requires_gradient_sync while accumulating."""
    import contextlib

    if is_sharded(module):
        module.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()
    if not enabled and hasattr(module, "no_sync"):
        return module.no_sync()
    return contextlib.nullcontext()
