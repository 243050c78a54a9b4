"""What each rank feeds the engine per iteration.

The data are indexed datasets (data/indexed.py), memory-mapped: a raw file given to --train-data
is preprocessed once into the cache (data/preprocess.py) and read the same way, so there is one
data path. A part's items are its samples fitted to --seq-length, or with --pack the packs its
index records. Iteration k draws the global batch's g items: from one part, items [k*g, (k+1)*g)
of the epoch's seeded permutation (a short tail is skipped); from a blend, each item from the part
blend.choose picks, the next one in that part's own permutation (its epochs wrap). DP rank r takes
items r, r+DP, ... of those, cut into GAS micro-batches of m, and reads only them. The global
batch is therefore the same whatever T, P, DP and m are, and the counts drawn from each part are
all a checkpoint needs to resume the same data order. Only the first and last pipeline stages read:
DeepSpeed loads micro-batches there alone (inputs on the first, labels on the last), so a middle
stage's are placeholders it never touches."""
import fcntl
import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .. import cli
from ..cli import device
from ..data import DataError, collate, collate_packed, shard_indices
from ..data.blend import choose, parse_blend, permutation
from ..data.indexed import VERSION, IndexedDataset, is_indexed, paths
from ..data.preprocess import Settings, check_tokenizer, preprocess, tokenizer_identity
from ..model.hub import cache_dir
from ..parallel import state

RAW_WORKERS_ABOVE = 64 << 20  # a raw file larger than this is tokenized by a pool of workers
VISIBLE_WITHIN = 120  # seconds a data cache file another node wrote may take to show on this one


class Part:
    """One dataset as training sees it: its items (samples fitted to --seq-length, or packs)."""

    def __init__(self, path: str, ds: IndexedDataset, args, pack: bool):
        self.path, self.ds, self.pack = path, ds, pack
        meta, L, mode = ds.meta, args.seq_length, args.overlong
        self.rows = meta["source"]["rows"]
        if meta["seq_length"]:  # fitted when preprocessed: the run must use the same fit
            if (meta["seq_length"], meta["overlong"]) != (L, mode):
                raise DataError(f"{path}: preprocessed for --seq-length {meta['seq_length']} --overlong "
                                f"{meta['overlong']}, but this run has --seq-length {L} --overlong {mode}")
            self.kept, self.limit = None, None
            self.truncated, self.dropped = meta["truncated"], meta["dropped"]
        else:  # fitted now, in numpy over the index (the first target of a sample is at prompt_len)
            keep = ds.lengths <= L if mode == "drop" else ds.prompt_lens < L
            n_kept = int(np.count_nonzero(keep))
            self.kept = None if n_kept == len(ds) else np.flatnonzero(keep)
            self.limit = L
            self.truncated = int(np.count_nonzero(keep & (ds.lengths > L)))
            self.dropped = meta["dropped"] + len(ds) - n_kept
        self.samples = self.rows - self.dropped
        if self.samples == 0:
            raise DataError(f"{path}: all {self.rows} rows are longer than --seq-length {L} "
                            f"(--overlong {mode} leaves no response token)")
        if pack and not ds.packs:
            raise DataError(f"{path}: has no pack layout (preprocess it with --seq-length {L} --pack)")
        self.items = ds.packs if pack else self.samples

    def item(self, j: int):
        """data.Sample j (data.Packed with --pack), read from the mapped files."""
        if self.pack:
            return self.ds.pack(j)
        return self.ds.sample(j if self.kept is None else int(self.kept[j]), self.limit)

    def describe(self) -> str:
        packs = f", {self.items} packs" if self.pack else ""
        return (f"{self.path}: {self.rows} rows -> {self.samples} samples ({self.truncated} truncated, "
                f"{self.dropped} dropped as longer than --seq-length){packs}")


def load_parts(values: list[str], flag: str, tokenizer, tokenizer_folder, args, pack: bool) -> list[tuple]:
    """--train-data / --valid-data values -> [(weight, Part)]. Every rank opens the same files."""
    out = []
    for weight, path in parse_blend(values, flag):
        if is_indexed(path):
            ds = IndexedDataset(path)
            check_tokenizer(ds.meta, tokenizer, paths(path)[2])
        else:
            ds = IndexedDataset(cached(path, tokenizer, tokenizer_folder, args))
        out.append((weight, Part(path, ds, args, pack)))
    return out


def cached(path, tokenizer, tokenizer_folder, args) -> str:
    """A raw file's indexed dataset in the cache, keyed by the file (path, size, mtime), the
    tokenizer and the settings. The first rank of a node writes it (atomically: a crash leaves
    nothing that reads as complete) while the others wait (`_build_once`); an error in the data is
    raised on every rank (also a file some node lacks: the others would wait for it in a collective)."""
    src = Path(path)
    prefix = error = None
    if not src.exists():
        error = f"{src}: no such file or folder (on {socket.gethostname()})"
    else:
        settings = Settings(args.prompt_key, args.response_key, args.seq_length, args.overlong, args.pack)
        files = sorted(src.rglob("*")) if src.is_dir() else [src]
        stamp = [(str(f.relative_to(src)) if src.is_dir() else "", f.stat().st_size, f.stat().st_mtime_ns)
                 for f in files if f.is_file()]
        ident = tokenizer_identity(tokenizer)
        key = json.dumps([str(src.resolve()), stamp, ident["hash"], ident["chat_template_sha256"],
                          settings.__dict__, VERSION])
        prefix = data_cache_dir() / f"{src.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"

    def build():
        # the cores this process may use (SLURM's allocation), not the whole machine's
        workers = len(os.sched_getaffinity(0)) if sum(s[1] for s in stamp) > RAW_WORKERS_ABOVE else 1
        try:
            preprocess(src, prefix, tokenizer_folder, settings, workers, progress=dist.get_rank() == 0)
        except DataError as e:
            return str(e)

    error = _build_once(prefix, build) or error
    error = cli.first_error(error)  # also the barrier: the cache is complete once every rank is past it
    if error:
        raise DataError(error, every_rank=True)
    _wait_visible(paths(prefix)[2])
    return str(prefix)


def _wait_visible(path: Path) -> None:
    """A file another node wrote can show here late: NFS keeps a name this node looked up as
    missing (the sidecar, before the build) until its cache of the folder expires, 60 s by default
    (acdirmax). Waiting that out beats failing the job on its first start."""
    deadline = time.monotonic() + VISIBLE_WITHIN
    while not path.is_file():
        if time.monotonic() > deadline:
            raise DataError(f"{path}: another node wrote it, but {socket.gethostname()} does not see it after "
                            f"{VISIBLE_WITHIN} s (a file system cache: NFS's lookupcache=positive mount option fixes it)")
        time.sleep(1)


def _build_once(prefix, build):
    """build() (-> its error, or None) on the node's first rank, while the node's others wait for it
    on a file lock rather than in a collective, which would give up after
    --distributed-timeout-minutes on a large file. Where locks span nodes (NFS; Lustre mounted with
    flock) one node builds and the others find its files. Every rank calls this (one barrier);
    prefix None: nothing to build. Without locks on the file system, the others wait in the
    caller's collective."""
    sidecar, lock, builds = paths(prefix)[2] if prefix else None, None, False
    if sidecar and not sidecar.is_file():
        sidecar.parent.mkdir(parents=True, exist_ok=True)
        lock = open(f"{prefix}.lock", "a")
        builds = state.node_local_rank() == 0 and _flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB) is not False
    dist.barrier()  # quick: every node's builder holds the lock before the others ask for it
    try:
        if builds:
            return None if sidecar.is_file() else build()  # (another node may have built it meanwhile)
        if lock:
            _flock(lock, fcntl.LOCK_SH)  # until the build holding it, this node's or another's, ends
        return None
    finally:
        if lock:
            lock.close()


def _flock(f, op):
    """True once locked; False where another process holds the lock (asked without blocking); None
    where the file system has no locks."""
    try:
        fcntl.flock(f, op)
        return True
    except BlockingIOError:
        return False
    except OSError:
        return None


def data_cache_dir() -> Path:
    return Path(os.environ.get("MEGATRON_ONPOLICY_DATA_CACHE", cache_dir() / "data"))


@dataclass
class Position:
    drawn: list = field(default_factory=list)  # items consumed from each part so far (all epochs)


class TrainBatches:
    def __init__(self, parts: list[tuple], args, dp: int, dp_rank: int, dp_group, gas: int, global_batch: int,
                 reads: bool = True):
        self.parts, self.reads = [p for _, p in parts], reads
        self.weights = np.array([w for w, _ in parts])
        self.args, self.dp, self.dp_rank, self.dp_group = args, dp, dp_rank, dp_group
        self.gas, self.global_batch = gas, global_batch
        self._orders = {}  # part -> (epoch, its permutation): one epoch's order per part at a time
        if len(self.parts) == 1:
            # One part: epochs of whole global batches, the tail skipped, as --epochs counts them.
            part = self.parts[0]
            self.epoch_items = [part.items // global_batch * global_batch]
            if self.epoch_items[0] == 0:
                what = "packed rows" if args.pack else "samples"
                raise DataError(f"{part.path}: {part.items} {what} < global batch size {global_batch}")
        else:
            self.epoch_items = [p.items for p in self.parts]

    def start(self) -> Position:
        return Position([0] * len(self.parts))

    def total_iters(self) -> int:
        if self.args.train_iters:
            return self.args.train_iters
        return self.args.epochs * self.epoch_items[0] // self.global_batch

    def where(self, pos: Position) -> dict:
        """The position for the metrics: epoch and items into it (for a blend: passes over the
        sum of its parts' items)."""
        epoch, offset = divmod(sum(pos.drawn), sum(self.epoch_items))
        return {"epoch": epoch, "epoch_position": offset}

    def draws(self, pos: Position) -> tuple[list, Position]:
        """The global batch's (part, item) pairs from `pos`, and the position after it."""
        drawn, picks = list(pos.drawn), []
        for _ in range(self.global_batch):
            d = choose(self.weights, drawn) if len(self.parts) > 1 else 0
            epoch, k = divmod(drawn[d], self.epoch_items[d])
            if self._orders.get(d, (None,))[0] != epoch:
                self._orders[d] = (epoch, permutation(self.parts[d].items, self.args.seed, d, epoch))
            picks.append((d, int(self._orders[d][1][k])))
            drawn[d] += 1
        return picks, Position(drawn)

    def next(self, pos: Position):
        """-> (micro-batches of this rank, global counts {loss_tokens, tokens}, position after); a
        rank that does not read gets GAS placeholders and no counts."""
        picks, after = self.draws(pos)
        if not self.reads:
            return [None] * self.gas, None, after
        mine = [self.parts[d].item(j) for d, j in picks[self.dp_rank::self.dp]]
        m = len(mine) // self.gas
        micro = [to_micro_batch(mine[i * m:(i + 1) * m], self.args.pack) for i in range(self.gas)]
        # One all-reduce over DP gives the global batch's token counts (the loss denominator).
        counts = torch.tensor([sum(float(labels[1].sum()) for _, labels in micro),
                               sum(len(item.input_ids) for item in mine)], dtype=torch.float64, device=device())
        if self.dp > 1:
            dist.all_reduce(counts, group=self.dp_group)
        return micro, {"loss_tokens": counts[0].item(), "tokens": counts[1].item()}, after


def to_micro_batch(items, packed: bool):
    """-> ((input_ids, position_ids[, segment_ids]), (targets, loss_mask)): what the pipeline's
    first stage and the loss on its last stage take. Padding sits right of every real token, so
    causal attention never lets it in and it is never a target: its id does not matter."""
    b = collate_packed(items, 0) if packed else collate(items, 0)
    inputs = (b["input_ids"], b["position_ids"]) + ((b["segment_ids"],) if packed else ())
    return inputs, (b["targets"], b["loss_mask"])


class ValidBatches:
    """This DP rank's share of the validation samples, m at a time, collated as each validation
    reads them: held padded for the whole run, a large validation set cost every rank several
    times its memory-mapped size. A rank left without any sample gets one batch with an empty loss
    mask, so that every rank takes part in the collectives."""

    def __init__(self, part: Part, micro: int, dp: int, dp_rank: int, reads: bool = True):
        self.part, self.micro, self.mine = part, micro, shard_indices(part.items, dp_rank, dp)
        self.reads = reads

    def __len__(self) -> int:
        return max(1, -(-len(self.mine) // self.micro))

    def __iter__(self):
        if not self.reads:  # as many placeholders as the stages that read have batches
            yield from [None] * len(self)
            return
        if not self.mine:
            inputs, (targets, mask) = to_micro_batch([self.part.item(0)], False)
            yield inputs, (targets, torch.zeros_like(mask))
        for i in range(0, len(self.mine), self.micro):
            yield to_micro_batch([self.part.item(j) for j in self.mine[i:i + self.micro]], False)
