"""Checkpoints: DeepSpeed's own files in DIR/iter_NNNNNNN, plus what DeepSpeed does not know.

- client_state: the iteration, the data position and the RNG states, so a resumed run repeats
  the uninterrupted one exactly;
- complete.json in the tag folder: the run's layout and model (tools/export_hf.py reads it).

A checkpoint is written as DIR/.partial-iter_NNNNNNN and renamed once every rank has finished
(DeepSpeed's file names inside do not depend on the tag), then DIR/latest is replaced
atomically. A crash while saving leaves only a .partial folder, which nothing reads and the next
save removes; the previous checkpoint and `latest` are untouched.
"""
import json
import random
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..model.hub import replace_dir
from ..outputs import write_json_atomic, write_text_atomic
from .args import TrainConfigError
from .batches import Position

MARKER = "complete.json"
PARTIAL = ".partial-"
_TAG = re.compile(r"(\.partial-)?iter_(\d{7})$")


def tag_of(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def save(engine, folder, iteration: int, position: Position, meta: dict, keep_last=None) -> None:
    """Every rank calls this. meta: the run's layout and data settings (checked on resume)."""
    folder, tag = Path(folder), tag_of(iteration)
    partial = PARTIAL + tag
    if dist.get_rank() == 0 and (folder / partial).exists():
        shutil.rmtree(folder / partial)
    dist.barrier()
    client = {"iteration": iteration, "data": asdict(position), "rng": _rng_state(), "meta": meta}
    engine.save_checkpoint(str(folder), partial, client_state=client, save_latest=False)
    dist.barrier()  # every rank's files are on disk
    if dist.get_rank() == 0:
        write_json_atomic(folder / partial / MARKER, {"iteration": iteration, **meta})
        replace_dir(folder / partial, folder / tag)
        write_text_atomic(folder / "latest", tag)
        _prune(folder, keep_last)
    dist.barrier()


def has_complete(folder) -> bool:
    """Whether `folder` holds a checkpoint `latest` names and that finished saving."""
    latest = Path(folder) / "latest"
    return latest.is_file() and (Path(folder) / latest.read_text().strip() / MARKER).is_file()


def read_checkpoint(folder, tag=None) -> tuple[str, dict]:
    """(tag, complete.json contents) of checkpoint `tag` in `folder`, by default the latest."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--load {folder}: no such folder")
    if tag is None:
        if not (folder / "latest").is_file():
            raise FileNotFoundError(f"--load {folder}: no checkpoint there (no 'latest' file)")
        tag = (folder / "latest").read_text().strip()
    marker = folder / tag / MARKER
    if not marker.is_file():
        raise FileNotFoundError(f"--load {folder}: no complete checkpoint '{tag}' (no {tag}/{MARKER})")
    return tag, json.loads(marker.read_text())


def load(engine, folder, meta: dict) -> tuple[int, Position]:
    """Restore the engine (weights, optimizer, lr schedule), RNG states; -> (iteration, position)."""
    tag, saved = read_checkpoint(folder)
    changed = [f"{k} {saved.get(k)} -> {v}" for k, v in meta.items() if saved.get(k) != v and k != "model"]
    if changed:
        raise TrainConfigError(f"--load {folder}/{tag} cannot continue exactly with this run's settings: "
                               + ", ".join(changed))
    with torch.no_grad():  # DeepSpeed re-broadcasts tied weights in place after loading them
        path, client = engine.load_checkpoint(str(folder), tag)
    if path is None:
        raise FileNotFoundError(f"--load {folder}: DeepSpeed could not load checkpoint '{tag}'")
    _set_rng_state(client["rng"])
    return client["iteration"], Position(**client["data"])


def _prune(folder: Path, keep_last) -> None:
    """Remove leftovers of crashed saves, and checkpoints beyond the newest `keep_last`."""
    tags = sorted((p for p in folder.iterdir() if p.is_dir() and _TAG.match(p.name)), key=lambda p: p.name[-7:])
    complete = [p for p in tags if not p.name.startswith(PARTIAL) and (p / MARKER).is_file()]
    keep = set(complete[-keep_last:] if keep_last else complete)
    for p in tags:
        if p not in keep:
            shutil.rmtree(p)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
