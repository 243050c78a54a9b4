"""Row outputs that survive crashes: per-shard files appended and flushed row by row, merged in
input order into the final file under a temporary name, then renamed."""
import json
import os
from pathlib import Path

import torch.distributed as dist


def write_text_atomic(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never a half-written one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


class ShardWriter:
    """Appends one JSON line per finished row. On open, a torn last line (a kill mid-write) is cut
    off, and the indices already present are known, so a restarted run can skip them."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done = set()
        good = 0
        if self.path.exists():
            with open(self.path, "rb") as f:
                for line in f:
                    try:
                        self.done.add(json.loads(line)["index"])
                    except (ValueError, KeyError):
                        break
                    good += len(line)
            os.truncate(self.path, good)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        self._f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._f.flush()
        self.done.add(row["index"])

    def close(self) -> None:
        self._f.close()


def shard_path(out: Path, dp_rank: int, dp_size: int) -> Path:
    out = Path(out)
    return out.with_name(f"{out.name}.part-{dp_rank:05d}-of-{dp_size:05d}")


def collect_shards(parts, expected: int) -> list:
    """The rows of all shard files, in input order; each index 0..expected-1 exactly once."""
    rows = {}
    for part in parts:
        with open(part, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                rows.setdefault(row["index"], row)
    missing = sorted(set(range(expected)) - set(rows))
    if missing:
        raise RuntimeError(f"{len(missing)} rows missing from the shard files (first: {missing[:5]})")
    return [rows[i] for i in range(expected)]


def write_jsonl_atomic(path: Path, rows) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def remove_shards(parts) -> None:
    """Only once the merged file is in place: until then the shards are the only copy."""
    for part in parts:
        os.remove(part)


def shard_files(out: Path) -> list:
    """Every shard file of `out`, of whatever layout wrote it (a run restarted on another number
    of ranks finds the rows its predecessors wrote, and merges them)."""
    out = Path(out)
    return sorted(out.parent.glob(f"{out.name}.part-*-of-*"))


def open_shards(out: Path, dp_rank: int, dp_size: int, writes: bool) -> tuple:
    """Every rank calls this, before any work: -> (this rank's ShardWriter, or None where it does
    not write; the indices of the rows any earlier run wrote, whatever its number of ranks).
    Rank 0 first cuts torn last lines off every shard file of `out`, so nothing reads them."""
    done = set()
    if dist.get_rank() == 0:
        for part in shard_files(out):
            writer = ShardWriter(part)
            writer.close()
            done |= writer.done
    done = [done]
    dist.broadcast_object_list(done, src=0)
    return (ShardWriter(shard_path(out, dp_rank, dp_size)) if writes else None), done[0]


def merge_shards(out: Path, expected: int, final: Path, field: str = None) -> list:
    """Rank 0, once every rank has finished: the rows of all shard files of `out` in input order
    (each row's `field` where rows are wrapped) -> `final`, written atomically; then the shards,
    no longer the only copy, are removed. -> the merged rows."""
    parts = shard_files(out)
    rows = collect_shards(parts, expected)
    if field:
        rows = [r[field] for r in rows]
    write_jsonl_atomic(final, rows)
    remove_shards(parts)
    return rows
