"""Outputs that survive crashes: per-shard files appended and flushed row by row, merged in input
order into the final file under a temporary name, then renamed; small files and whole folders
(checkpoints, exports) put in place atomically, and on disk before what they replace goes."""
import datetime
import decimal
import errno
import json
import math
import os
import re
import shutil
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .data.rows import DataError


def _tmp_name(path: Path) -> Path:
    """A temporary name beside `path` that no other writer has: processes on several nodes may
    write the same file of a shared file system (each node's data cache), and their pids can be
    equal (containers number their processes alike)."""
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:16]}")


def fsync_dir(folder: Path) -> None:
    """Put a folder's entries (the files created or renamed in it) on disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems cannot sync a folder (PostgreSQL's fsync_fname, alike)
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Put a written file's contents on disk (on the node that wrote it: a network file system
    writes back a client's cache on that client's fsync, not on another's)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextmanager
def atomic_file(path: Path):
    """A text file to write, put in place of `path` once written: readers see the old file or the
    new one, never a half-written one. The new one is on disk, contents and name, when this
    returns, not only in the node's cache: what it replaces or lets go of (the checkpoint `latest`
    named, which the save then prunes; shards merged into it, then removed) must not be lost with
    a node that fails a moment later."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
    except BaseException:  # a writer that fails (a corrupt row mid-merge) leaves no stray copy
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    fsync_dir(path.parent)


def replace_dir(tmp: Path, out: Path) -> None:
    """Put a fully written folder in place of `out`; the old one survives until the new one is in,
    on disk (its files' contents are their writers' to sync, see fsync_file)."""
    out = Path(out)
    old = out.parent / f"{out.name}.old-{os.getpid()}"
    fsync_dir(tmp)
    if out.exists():
        os.rename(out, old)
    os.rename(tmp, out)
    fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_file(path) as f:
        f.write(text)


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def _as_json(value):
    """Values that Parquet and datasets rows hold and JSON does not: dates and times as ISO 8601
    text and decimals as text, as pandas' to_json writes them."""
    if isinstance(value, (datetime.date, datetime.time)):  # (a datetime is a date)
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    raise TypeError(f"JSON cannot hold a {type(value).__name__}")


def json_line(row) -> str:
    return json.dumps(row, ensure_ascii=False, default=_as_json) + "\n"


def check_writable(fields: dict, source: str) -> None:
    """The input fields an output row copies: checked before the row's work is done, so that a
    column JSON cannot hold (binary, say) stops the run at once and by name."""
    for key, value in fields.items():
        try:  # (Python's json reads NaN and 1e400 -> inf, and would write them as no JSON parser reads them)
            json.dumps(value, allow_nan=False, default=_as_json)
        except (TypeError, ValueError) as e:
            raise DataError(f"{source}: field '{key}': {e}; drop or convert that column") from None


def check_no_clash(row, output_keys) -> None:
    """An input field named like one a tool writes (a file the tool wrote, given again) would be
    overwritten: a DataError instead."""
    clash = sorted(set(output_keys) & row.data.keys())
    if clash:
        raise DataError(f"{row.source}: field '{clash[0]}' has the name of an output field; rename or drop it")


class ShardWriter:
    """Appends one JSON line `{"index": i, ...}` per finished row, flushed, so a kill loses at most
    the line being written (cut off on the next open, see `cut_torn_line`). settings: (file,
    dict) written before the first row where the file is missing (see `open_shards`)."""

    def __init__(self, path: Path, settings: tuple = None):
        self.path, self.settings = Path(path), settings
        self._f = None  # opened at the first row: a run that fails before any leaves no file

    def write(self, row: dict) -> None:
        if self._f is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.settings and not self.settings[0].exists():
                write_json_atomic(*self.settings)  # (every writer alike: the same bytes)
            if self.path.exists():
                cut_torn_line(self.path)
            self._f = open(self.path, "a", encoding="utf-8")
        self._f.write(json_line(row))
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


def cut_torn_line(path: Path) -> None:
    """A line is complete once its newline is written (json.dumps escapes any inside it): cut the
    file after its last newline. Reads only the file's tail."""
    with open(path, "rb+") as f:
        end = f.seek(0, os.SEEK_END)
        pos = end
        while pos > 0:
            step = min(pos, 1 << 16)
            f.seek(pos - step)
            tail = f.read(step)
            nl = tail.rfind(b"\n")
            if nl >= 0:
                pos = pos - step + nl + 1
                break
            pos -= step
        if pos != end:
            f.truncate(pos)


_INDEX = re.compile(rb'\{"index": (\d+)[,}]')  # how ShardWriter's json.dumps starts every line


def _indexed_lines(part):
    """(byte offset, row index) of each line of a shard file, the index read from the line's start
    (no parse of the rest). A node lost mid-write can leave zero-filled pages before a later line's
    newline: a line holding a NUL byte (json.dumps writes none) is skipped, so its rows are redone,
    also where it starts like a row. Any other line that is no row is an error that names it,
    rather than a file taken for less than it is."""
    with open(part, "rb") as f:
        pos = 0
        for number, line in enumerate(f, 1):
            if b"\0" in line:
                print(f"{part}:{number}: skipped, zero-filled (written by a node lost mid-write); its rows are "
                      "redone", file=sys.stderr, flush=True)
                pos += len(line)
                continue
            m = _INDEX.match(line)
            try:
                i = int(m[1]) if m else json.loads(line)["index"]
            except (ValueError, TypeError, KeyError):
                raise DataError(f"{part}:{number}: not a row ({line[:40]!r}); delete that line "
                                f"(sed -i '{number}d' {part}) and rerun: its row is redone") from None
            yield pos, i
            pos += len(line)


def written_indices(parts):
    """The row index of every line of the shard files."""
    for part in parts:
        for _, i in _indexed_lines(part):
            yield i


def shard_path(out: Path, dp_rank: int, dp_size: int) -> Path:
    out = Path(out)
    return out.with_name(f"{out.name}.part-{dp_rank:05d}-of-{dp_size:05d}")


def _line_table(parts, expected: int) -> tuple:
    """(file number, byte offset) of the first line of each row index 0..expected-1 in the shard
    files: 12 bytes a row, where the rows themselves may be kilobytes each."""
    part_of = np.full(expected, -1, dtype=np.int32)
    offset = np.zeros(expected, dtype=np.int64)
    for k, part in enumerate(parts):
        for pos, i in _indexed_lines(part):
            if i < expected and part_of[i] < 0:  # a row written twice (by two layouts) is the same row
                part_of[i], offset[i] = k, pos
    missing = np.flatnonzero(part_of < 0)
    if len(missing):
        raise RuntimeError(f"{len(missing)} rows missing from the shard files (first: {missing[:5].tolist()})")
    return part_of, offset


def _rows_in_order(parts, part_of, offset, field: str = None):
    """Each row of the table in input order, read from its shard file; one row in memory at a time.
    Within a file the rows of a share come nearly in order, so reads stay mostly sequential."""
    files = [open(part, "rb") for part in parts]
    try:
        for k, pos in zip(part_of, offset):
            f = files[k]
            f.seek(pos)
            row = json.loads(f.readline())
            yield row[field] if field else row
    finally:
        for f in files:
            f.close()


def write_jsonl_atomic(path: Path, rows) -> None:
    with atomic_file(path) as f:
        for row in rows:
            f.write(json_line(row))


def remove_shards(parts) -> None:
    """Only once the merged file is in place: until then the shards are the only copy."""
    for part in parts:
        os.remove(part)


def shard_files(out: Path) -> list:
    """Every shard file of `out`, of whatever layout wrote it (a run restarted on another number
    of ranks finds the rows its predecessors wrote, and merges them)."""
    out = Path(out)
    return sorted(out.parent.glob(f"{out.name}.part-*-of-*"))


_LAYOUT = re.compile(r"\.part-(\d+)-of-(\d+)$")


def share_files(out: Path, dp_rank: int, dp_size: int) -> list:
    """The shard files of `out` that can hold rows of the share `shard_indices(n, dp_rank,
    dp_size)`. File part-k-of-S holds rows i = k (mod S) only, so it meets the share (i = dp_rank
    (mod dp_size)) exactly where k = dp_rank (mod gcd(S, dp_size)) (Chinese remainder theorem). A
    restart on the same layout reads its own file, not every rank's; a file named otherwise is read."""
    keep = []
    for part in shard_files(out):
        m = _LAYOUT.search(part.name)
        if m is None or (int(m[1]) - dp_rank) % math.gcd(int(m[2]), dp_size) == 0:
            keep.append(part)
    return keep


def settings_path(out: Path) -> Path:
    out = Path(out)
    return out.with_name(f"{out.name}.settings.json")


def open_shards(out: Path, dp_rank: int, dp_size: int, writes: bool, device, settings: dict) -> tuple:
    """Every rank calls this, before any work: -> (this rank's ShardWriter, or None where it does
    not write; the indices of its group's share, `shard_indices(n, dp_rank, dp_size)`, that any
    earlier run wrote, whatever its number of ranks; how many rows all earlier runs wrote).
    Rank 0 first cuts torn last lines off every shard file of `out`; then each rank scans the
    files that can hold its share (`share_files`) for it, so no rank holds (or receives) the
    indices of the others.

    settings: what a row's output depends on (input, model, generation settings), kept beside
    the shards by the writers of the run that starts them, before their first row: a restart with
    other settings is an error, not a file of rows made two ways. A run that writes no row writes
    nothing."""
    path = settings_path(out)
    settings = json.loads(json.dumps(settings))  # as the file holds them (tuples are lists)
    if dist.get_rank() == 0:
        parts = shard_files(out)
        for part in parts:
            cut_torn_line(part)
        if not parts:  # those of a run that wrote no row
            path.unlink(missing_ok=True)
    dist.barrier()
    error = None
    if path.exists():  # (shards of a version that kept no settings are taken as they are)
        before = json.loads(path.read_text())
        changed = [f"{k} {before.get(k)!r} -> {settings.get(k)!r}" for k in sorted(before.keys() | settings.keys())
                   if before.get(k) != settings.get(k)]
        if changed:
            error = (f"{out}: its rows so far were made with other settings ({'; '.join(changed)}): "
                     f"rerun with those, or write elsewhere")
    done = set()
    if error is None:
        try:  # (a line that is no row, in a file only some ranks read: those ranks alone find it)
            done = {i for i in written_indices(share_files(out, dp_rank, dp_size)) if i % dp_size == dp_rank}
        except DataError as e:
            error = str(e)
    from .cli import first_error  # (here: cli imports the data package, which imports this module)
    error = first_error(error)
    if error:
        raise DataError(error, every_rank=True)  # one line, not one a rank, and no rank left waiting
    total = torch.tensor([len(done) if writes else 0], dtype=torch.long, device=device)
    dist.all_reduce(total)  # one writer per group: the groups' shares are disjoint
    writer = ShardWriter(shard_path(out, dp_rank, dp_size), (path, settings)) if writes else None
    return writer, done, int(total.item())


@contextmanager
def merge_shards(out: Path, expected: int, final: Path, field: str = None):
    """Rank 0, once every rank has finished: the rows of all shard files of `out` in input order
    (each row's `field` where rows are wrapped) -> `final`, written atomically and streamed (rank 0
    holds 12 bytes a row, not the rows). The shards are removed once the `with` block, which
    writes what derives from `final` (a summary, a filtered copy), ends without error: a run
    killed before that finds every row done when rerun, and only writes the files again."""
    parts = shard_files(out)
    part_of, offset = _line_table(parts, expected)
    write_jsonl_atomic(final, _rows_in_order(parts, part_of, offset, field))
    yield
    remove_shards(parts)
    settings_path(out).unlink(missing_ok=True)


def read_jsonl(path: Path):
    """The rows of a JSONL file this package wrote, one at a time."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)
