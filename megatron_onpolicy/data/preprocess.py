"""Rows (JSONL, Parquet, datasets folder) -> an indexed dataset (indexed.py), streaming.

The main process reads the source in chunks of rows (JSONL lines, Parquet batches, dataset
slices), workers tokenize them (a bounded number of chunks in flight, results taken in input
order), and the main process appends them to temporary files: the .bin records and one file per
index column. Memory stays bounded by the chunks in flight and the packing window, whatever the
source's size; the output depends only on the input and the settings, not on the number of
workers. The files get their final names only once complete and on disk (.bin, then .idx, then
the .json sidecar last); the temporary folder of a build that was killed is removed by the next
build of the same prefix on that host."""
import fcntl
import hashlib
import json
import os
import shutil
import socket
import tempfile
import zlib
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from itertools import islice
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..model.hub import load_tokenizer
from ..outputs import fsync_file, write_json_atomic
from .batches import fit_length
from .indexed import HEADER, MAGIC, VERSION, encode_records, paths, token_dtype
from .packing import FirstFit
from .rows import DataError, Row, open_datasets_folder, parquet_error, parse_jsonl_line
from .tokenization import tokenize_row

CHUNK = 256  # rows per task: large enough to amortize a round trip, small enough to keep workers even


@dataclass(frozen=True)
class Settings:
    prompt_key: str = "prompt"
    response_key: str = "response"
    seq_length: int | None = None  # fit samples to it (--overlong); needed for packing
    overlong: str = "truncate"
    pack: bool = False


def tokenizer_identity(tokenizer) -> dict:
    """What must be equal for two tokenizers to give the same ids: the vocabulary (added tokens
    included), the special tokens, and the chat template."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    special = json.dumps([tokenizer.special_tokens_map, tokenizer.eos_token_id, tokenizer.bos_token_id],
                         sort_keys=True)
    return {"name": str(tokenizer.name_or_path), "vocab_size": len(tokenizer),
            "hash": _sha256(vocab + "\n" + special),
            "chat_template_sha256": _sha256(tokenizer.chat_template or "")}


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def check_tokenizer(meta: dict, tokenizer, where) -> None:
    """A one-line DataError if `tokenizer` is not the one the dataset was made with."""
    made, have = meta["tokenizer"], tokenizer_identity(tokenizer)
    if made["hash"] != have["hash"]:
        raise DataError(f"{where}: made with tokenizer {made['name']} (vocab {made['vocab_size']}, hash "
                        f"{made['hash'][:12]}), but the model's is {have['name']} (vocab {have['vocab_size']}, "
                        f"hash {have['hash'][:12]}): preprocess again with this --model")
    if made["chat_template_sha256"] != have["chat_template_sha256"]:
        raise DataError(f"{where}: made with another chat template (sha256 {made['chat_template_sha256'][:12]}, "
                        f"the model's {have['chat_template_sha256'][:12]}): preprocess again with this --model")


def preprocess(source, prefix, tokenizer_path, settings: Settings, workers: int = 1, progress=True) -> dict:
    """Write PREFIX.{bin,idx,json} from `source`; -> the sidecar's contents."""
    if settings.pack and not settings.seq_length:
        raise DataError("--pack needs --seq-length (the packs' length)")
    source = Path(source)
    tokenizer = load_tokenizer(tokenizer_path)
    dtype = token_dtype(len(tokenizer))
    bin_path, idx_path, json_path = paths(prefix)
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    tmp, lock = _claim_tmp(bin_path)
    try:
        chunks, total = _chunks(source)
        writer = _Writer(tmp, dtype, settings)
        args = (str(tokenizer_path), settings, dtype.str)
        with tqdm(total=total, unit="rows", desc=f"preprocess {source.name}", disable=not progress,
                  dynamic_ncols=True) as bar:
            for result in _map(chunks, args, workers, source):
                writer.add(result)
                bar.update(result["rows"])
        if writer.rows == 0:
            raise DataError(f"{source}: no rows")
        if writer.samples == 0:
            raise DataError(f"{source}: all {writer.rows} rows are longer than --seq-length {settings.seq_length} "
                            f"(--overlong {settings.overlong} leaves no response token)")
        crc = writer.finish(tmp / "idx")
        meta = {"format_version": VERSION, "tokenizer": tokenizer_identity(tokenizer), "dtype": dtype.name,
                "source": {"path": str(source), "rows": writer.rows}, **asdict(settings),
                "samples": writer.samples, "truncated": writer.truncated, "dropped": writer.dropped,
                "packs": writer.packs, "tokens": writer.tokens, "idx_crc32": crc}
        # On disk before they take their names: the sidecar's CRC covers the .idx, not the .bin,
        # so a .bin a lost node left zero-filled at its full size would read as tokens.
        fsync_file(tmp / "bin")
        fsync_file(tmp / "idx")
        os.replace(tmp / "bin", bin_path)
        os.replace(tmp / "idx", idx_path)
        write_json_atomic(json_path, meta)
        return meta
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        lock.close()


def _claim_tmp(bin_path: Path):
    """-> (a new temporary folder beside bin_path, the open file whose flock marks it in use).

    A build that is killed (SIGKILL, a node lost, a job over its time limit) cannot remove its
    folder, which may hold gigabytes. The kernel releases a dead process's flock, so an unlocked
    folder is a dead build's: this removes those of its host first. Only its host's: a file
    system whose locks are node-local (Lustre's localflock) cannot tell of another node's builds.
    The lock file gets its name only once locked, so a folder named with one is never taken for
    dead while its build starts."""
    prefix = f".{bin_path.name}.tmp-{socket.gethostname()}-"
    for stale in bin_path.parent.glob(prefix + "*"):
        try:
            with open(stale / "lock", "r+") as f:  # r+: never creates it, and NFS locks need write access
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:  # in use (BlockingIOError), no lock file yet, or no flock on this file system
            pass
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=bin_path.parent))
    lock = open(tmp / "lock.new", "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pass  # no flock here: the folder is never taken for a dead build's, and is left if killed
    else:
        os.replace(tmp / "lock.new", tmp / "lock")
    return tmp, lock


def _chunks(source: Path):
    """-> (iterator of (first row index, [(where, line number or None, payload)]), row count if known)."""
    if not source.exists():
        raise DataError(f"{source}: no such file or folder")
    if source.is_dir():
        ds = open_datasets_folder(source)
        items = ((f"{source}:row {i}", None, row) for i, row in enumerate(_dataset_rows(ds)))
        total = len(ds)
    elif source.suffix in (".jsonl", ".json"):
        items = _jsonl_items(source)
        total = None
    elif source.suffix == ".parquet":
        items, total = _parquet_items(source)
    else:
        raise DataError(f"{source}: unknown format '{source.suffix}' "
                        "(expected .jsonl, .json lines, .parquet or a datasets folder)")
    return _batched(items), total


def _batched(items):
    start = 0
    while chunk := list(islice(items, CHUNK)):
        yield start, chunk
        start += len(chunk)


def _jsonl_items(path: Path):
    # Lines go to the workers as bytes; they parse them (rows.parse_jsonl_line: the same errors).
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield str(path), lineno, line


def _parquet_items(path: Path):
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt or foreign file
        raise parquet_error(path, e) from None

    def items():
        i = 0
        try:
            for batch in pf.iter_batches(batch_size=CHUNK):
                for row in batch.to_pylist():
                    yield f"{path}:row {i}", None, row
                    i += 1
        except Exception as e:
            raise parquet_error(path, e) from None
    return items(), pf.metadata.num_rows


def _dataset_rows(ds):
    for start in range(0, len(ds), CHUNK):
        yield from ds.select(range(start, min(start + CHUNK, len(ds)))).to_list()


def _map(chunks, args, workers: int, source: Path):
    if workers <= 1:
        _init(*args)
        yield from map(_tokenize_chunk, chunks)
        return
    # spawn: a fork of a process holding a tokenizer's threads (or torch's) can deadlock. An executor,
    # not multiprocessing.Pool: a worker that dies (the OOM killer, a crash in the tokenizer) breaks it,
    # where a Pool replaces the worker and waits forever for the result of its chunk.
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init, initargs=args)
    # (chunk, its future): at most 2 chunks per worker in flight (pool.map would queue the whole source),
    # taken in input order.
    pending = deque()
    try:
        for chunk in chunks:
            pending.append((chunk, pool.submit(_tokenize_chunk, chunk)))
            if len(pending) >= 2 * workers:
                yield pending[0][1].result()
                pending.popleft()
        while pending:
            yield pending[0][1].result()
            pending.popleft()
    except BrokenProcessPool:
        # The executor cannot tell which chunk the dead worker held: name the rows of all in flight.
        held = [c for c, _ in pending] or [chunk]
        (start, first), (end, last) = held[0], held[-1]
        lines = f" (lines {first[0][1]}-{last[-1][1]})" if first[0][1] is not None else ""
        raise DataError(f"{source}: a worker process died tokenizing rows {start}-{end + len(last) - 1}{lines}, "
                        "e.g. killed for lack of memory, or a crash in the tokenizer") from None
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # an error stops the build now, not after the queue


_WORKER = {}


def _init(tokenizer_path: str, settings: Settings, dtype: str) -> None:
    _WORKER.update(tokenizer=load_tokenizer(tokenizer_path), settings=settings, dtype=np.dtype(dtype))


def _tokenize_chunk(task) -> dict:
    """Worker: one chunk of rows -> its kept samples as .bin records plus their index columns."""
    start, items = task
    tok, s = _WORKER["tokenizer"], _WORKER["settings"]
    ids, masks, prompt_lens, rows, truncated = [], [], [], [], 0
    for i, (where, lineno, payload) in enumerate(items, start):
        row = parse_jsonl_line(where, lineno, payload) if lineno is not None else Row(payload, where)
        sample = tokenize_row(tok, row.data, row.source, i, s.prompt_key, s.response_key)
        if s.seq_length:
            fitted = fit_length(sample, s.seq_length, s.overlong)
            if fitted is None:
                continue
            truncated += fitted is not sample
            sample = fitted
        ids.append(np.asarray(sample.input_ids))
        masks.append(np.asarray(sample.loss_mask))
        prompt_lens.append(sample.prompt_len)
        rows.append(i)
    records, sizes = encode_records(ids, masks, _WORKER["dtype"])
    return {"rows": len(items), "records": records, "sizes": sizes,
            "lengths": np.array([len(t) for t in ids], np.int32), "prompt_lens": np.array(prompt_lens, np.int32),
            "row_ids": np.array(rows, np.int64), "truncated": truncated}


class _Writer:
    """Appends chunks' results to the temporary files; packs as the samples arrive."""

    COLUMNS = (("offsets", np.int64), ("lengths", np.int32), ("prompt_lens", np.int32), ("rows", np.int64),
               ("pack_starts", np.int64), ("pack_samples", np.int64))

    def __init__(self, tmp: Path, dtype, settings: Settings):
        self.tmp, self.dtype = tmp, dtype
        self.bin = open(tmp / "bin", "wb")
        self.cols = {name: open(tmp / name, "wb") for name, _ in self.COLUMNS}
        self.fit = FirstFit(settings.seq_length) if settings.pack else None
        self.rows = self.samples = self.truncated = self.tokens = self.packs = self.bin_bytes = 0
        self.packed = 0
        if self.fit:
            np.zeros(1, np.int64).tofile(self.cols["pack_starts"])

    @property
    def dropped(self) -> int:
        return self.rows - self.samples

    def add(self, r: dict) -> None:
        n = len(r["lengths"])
        offsets = (self.bin_bytes + np.cumsum(r["sizes"]) - r["sizes"]).astype(np.int64)
        self.bin.write(r["records"])
        for name, values in (("offsets", offsets), ("lengths", r["lengths"]), ("prompt_lens", r["prompt_lens"]),
                             ("rows", r["row_ids"])):
            values.tofile(self.cols[name])
        if self.fit:
            for k, length in enumerate(r["lengths"].tolist()):
                self._close(self.fit.add(self.samples + k, length))
        self.rows += r["rows"]
        self.samples += n
        self.truncated += r["truncated"]
        self.tokens += int(r["lengths"].sum())
        self.bin_bytes += len(r["records"])

    def _close(self, packs) -> None:
        for ids in packs:
            self.packed += len(ids)
            np.array(ids, np.int64).tofile(self.cols["pack_samples"])
            np.array([self.packed], np.int64).tofile(self.cols["pack_starts"])
            self.packs += 1

    def finish(self, idx_path: Path) -> int:
        """Close the files and assemble the .idx (header last, with the CRC of the body); -> the CRC."""
        if self.fit:
            self._close(self.fit.finish())
        self.bin.close()
        for f in self.cols.values():
            f.close()
        crc = 0
        with open(idx_path, "wb") as out:
            out.write(bytes(HEADER.size))
            for name, _ in self.COLUMNS:
                with open(self.tmp / name, "rb") as f:
                    while block := f.read(1 << 20):
                        crc = zlib.crc32(block, crc)
                        out.write(block)
            out.seek(0)
            out.write(HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, self.samples, self.packs, self.bin_bytes, crc))
        return crc
