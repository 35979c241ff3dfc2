"""Checkpoint files: written atomically, loaded without unpickling code, with every RNG a run uses.

A checkpoint is one `ckpt.pt` in the training --out directory. It holds only tensors and plain Python
values, so it loads with `torch.load(weights_only=True)`: opening a checkpoint cannot run code.
"""

import os
import random
from pathlib import Path

import numpy as np
import torch

from finegpt.errors import FinegptError

CKPT_NAME = "ckpt.pt"


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint file for `path`: a training --out directory or a checkpoint file in it."""
    path = Path(path)
    if path.is_dir():
        path = path / CKPT_NAME
    if not path.is_file():
        raise FinegptError(f"no checkpoint at {path}: pass a training --out directory or its {CKPT_NAME}")
    return path


def save_atomic(payload: dict, path: Path) -> None:
    """Write to a temporary name, then rename: a crash mid-write leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which file, not a pickle traceback
        raise FinegptError(f"cannot read checkpoint {path}: {err}") from None


def rng_state() -> dict:
    """Every random generator a training step may draw from (dropout, init, the loader's seed logic)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
