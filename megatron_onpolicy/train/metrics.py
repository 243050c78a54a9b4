"""Per-iteration metrics: a tqdm bar on the console, TensorBoard, and metrics.jsonl.

The numbers come from the loss function, so from the last pipeline stage: its ranks all-reduce
their sums over DP, and one of them (DP rank 0, TP rank 0) writes. Histograms hold that writer's
own tokens (kept on the device until TensorBoard takes them)."""
import json
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..outputs import write_text_atomic
from ..parallel import state
from .loss import SUMS


def writer_rank() -> int:
    """The global rank that writes metrics: last stage, DP rank 0, TP rank 0."""
    return state.topology().get_rank(pipe=state.get_pipeline_model_parallel_world_size() - 1, data=0, model=0)


def is_last_stage() -> bool:
    return state.get_pipeline_model_parallel_rank() == state.get_pipeline_model_parallel_world_size() - 1


def global_sums(loss_fn) -> dict:
    """The loss function's sums since its last reset, over all DP ranks (call on the last stage)."""
    sums = loss_fn.sums.clone()
    if state.get_data_parallel_world_size() > 1:
        dist.all_reduce(sums, group=state.get_data_parallel_group())
    return dict(zip(SUMS, sums.tolist()))


def token_summary(s: dict, kind: str) -> dict:
    n = max(s["tokens"], 1.0)
    mean = s["phi"] / n
    return {"loss": s[f"loss_{kind}"] / n, "phi_mean": mean,
            "phi_std": math.sqrt(max(s["phi_sq"] / n - mean * mean, 0.0)),
            "gamma_mean": s["gamma"] / n, "frac_phi_lt_-1": s["phi_lt_-1"] / n,
            **{k: s[k] / n for k in SUMS if k.startswith("loss_")}}


class MetricsLog:
    """Only the writer rank opens files. A resumed run keeps the records up to the iteration it
    resumes from and drops any later ones (written after that checkpoint, then lost)."""

    def __init__(self, folder: Path, tensorboard_dir, total_iters: int, start_iter: int):
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "metrics.jsonl"
        _keep_until(self.path, start_iter)
        self.file = open(self.path, "a", encoding="utf-8")
        self.tb = None
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(tensorboard_dir, purge_step=start_iter + 1)
        self.bar = tqdm(total=total_iters, initial=start_iter, desc="train", unit="it", file=sys.stdout,
                        dynamic_ncols=True)

    def log(self, record: dict, phi, gamma) -> None:
        it = record["iteration"]
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb:
            for key, value in record.items():
                if key != "iteration" and isinstance(value, (int, float)):
                    self.tb.add_scalar(("valid/" if key.startswith("valid_") else "train/") + key, value, it)
            if len(phi):
                self.tb.add_histogram("train/phi", phi, it)
                self.tb.add_histogram("train/gamma", gamma, it)
            self.tb.flush()
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                             tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
        self.bar.update(it - self.bar.n)
        if "valid_loss" in record:
            self.bar.write(f"iteration {it}: valid loss {record['valid_loss']:.4f}, "
                           f"valid phi {record['valid_phi_mean']:.4f}")

    def close(self) -> None:
        self.bar.close()
        self.file.close()
        if self.tb:
            self.tb.close()


def _keep_until(path: Path, iteration: int) -> None:
    if not path.exists():
        return
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:  # a torn last line
                break
            if record.get("iteration", 0) <= iteration:
                kept.append(line)
    write_text_atomic(path, "".join(kept))


def cat(chunks) -> torch.Tensor:
    """The loss tokens' values of TrainLoss's (values, loss mask) chunks, in one tensor."""
    return torch.cat([values[keep] for values, keep in chunks]) if chunks else torch.zeros(0)
