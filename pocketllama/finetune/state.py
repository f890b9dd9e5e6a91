"""Training checkpoints written atomically (a temporary folder renamed into place, so a killed run leaves
either a whole checkpoint or none), the RNG states, and the run fingerprint a resume must match.

Layout: OUT/checkpoints/step-000010/{adapter files | model.safetensors, trainer_state.pt}.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "trainer_state.pt"
_PREFIX = "step-"


def checkpoints_dir(out: Path) -> Path:
    return Path(out) / "checkpoints"


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of an interrupted save are not listed)."""
    root = checkpoints_dir(out)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and (p / STATE_FILE).is_file()
             and p.name[len(_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]))


def latest_checkpoint(out: Path) -> Path | None:
    found = list_checkpoints(out)
    return found[-1] if found else None


def write_checkpoint(out: Path, step: int, write: Callable[[Path], None], keep: int | None = 2) -> Path:
    """Call `write(folder)` on a temporary folder, flush it to disk, rename it to step-NNNNNN, then delete
    all but the newest `keep` checkpoints (None: keep all)."""
    root = checkpoints_dir(out)
    root.mkdir(parents=True, exist_ok=True)
    remove_partial(out)
    tmp = root / f".tmp-{_PREFIX}{step:06d}"
    tmp.mkdir()
    write(tmp)
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    final = root / f"{_PREFIX}{step:06d}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    if keep is not None:
        for old in list_checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def remove_partial(out: Path) -> None:
    """Delete the temporary folders of saves that a killed run left half-written."""
    root = checkpoints_dir(out)
    if root.is_dir():
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_state(folder: Path, state: dict[str, Any]) -> None:
    torch.save(state, folder / STATE_FILE)


def load_state(folder: Path) -> dict[str, Any]:
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a training checkpoint (no {STATE_FILE})")
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def file_digest(path: str | os.PathLike[str] | None) -> str | None:
    if path is None:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def check_fingerprint(saved: dict[str, Any], current: dict[str, Any], where: Path) -> None:
    """A resumed run must be the same run: same data, model, method and schedule (the fields that decide
    which examples each step sees and what the optimizer does)."""
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}"
             for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if diffs:
        raise ValueError(f"cannot resume from {where}: this run differs from the checkpointed one (" +
                         "; ".join(diffs) + "); start a new output folder or restore the original settings")
