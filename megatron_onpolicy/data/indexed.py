"""The memory-mapped indexed dataset: tokenized samples with their loss mask, on disk.

PREFIX.bin  per sample: its token ids (uint16 when the vocabulary fits, else uint32), then its loss
            mask (one uint8 per token), then zero padding to a multiple of 4 bytes.
PREFIX.idx  a header (magic, version, token size, counts, the .bin size, CRC-32 of the rest), then
            arrays: offsets int64 (byte offset in .bin), lengths int32, prompt_lens int32,
            rows int64 (the sample's row in the source), and with packing pack_starts int64
            [packs + 1] into pack_samples int64 [samples] (the samples of pack p, in order).
PREFIX.json the sidecar: tokenizer and chat template identity, source, settings, counts.

Readers map both files and touch only the samples they read; a truncated or damaged file is
found by the header (sizes, CRC) before any sample is read."""
import json
import struct
import zlib
from pathlib import Path

import numpy as np

from .batches import Packed, concat
from .rows import DataError
from .tokenization import Sample

MAGIC = b"MOPIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<8sIIqqqI")  # magic, version, itemsize, samples, packs, bin bytes, crc32
ALIGN = 4


def paths(prefix) -> tuple[Path, Path, Path]:
    prefix = str(prefix)
    return Path(prefix + ".bin"), Path(prefix + ".idx"), Path(prefix + ".json")


def is_indexed(prefix) -> bool:
    return paths(prefix)[1].is_file()


def token_dtype(vocab_size: int):
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def encode_records(ids: list[np.ndarray], masks: list[np.ndarray], dtype) -> tuple[bytes, np.ndarray]:
    """Samples -> (their .bin records, each record's size in bytes)."""
    parts, sizes = [], np.empty(len(ids), np.int64)
    for i, (t, m) in enumerate(zip(ids, masks)):
        raw = t.astype(dtype).tobytes() + m.astype(np.uint8).tobytes()
        raw += bytes(-len(raw) % ALIGN)
        parts.append(raw)
        sizes[i] = len(raw)
    return b"".join(parts), sizes


class IndexedDataset:
    """Read-only view of PREFIX.{bin,idx,json}. Errors name the file that is wrong."""

    def __init__(self, prefix):
        self.prefix = str(prefix)
        bin_path, idx_path, json_path = paths(prefix)
        for p in (bin_path, idx_path, json_path):
            if not p.is_file():
                raise DataError(f"{p}: no such file (an indexed dataset needs {self.prefix}.bin, .idx and .json)")
        try:
            self.meta = json.loads(json_path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise DataError(f"{json_path}: not valid JSON ({e})") from None
        idx = np.memmap(idx_path, np.uint8, mode="r") if idx_path.stat().st_size else np.zeros(0, np.uint8)
        if len(idx) < HEADER.size:
            raise DataError(f"{idx_path}: truncated ({len(idx)} bytes, not even a header)")
        magic, version, itemsize, n, packs, bin_bytes, crc = HEADER.unpack(idx[:HEADER.size].tobytes())
        if magic != MAGIC:
            raise DataError(f"{idx_path}: not an indexed dataset (bad magic number)")
        if version != VERSION:
            raise DataError(f"{idx_path}: format version {version}, this code reads version {VERSION}")
        in_packs = n if packs else 0
        expected = HEADER.size + n * (8 + 4 + 4 + 8) + (packs + 1 if packs else 0) * 8 + in_packs * 8
        if len(idx) != expected or itemsize not in (2, 4):
            raise DataError(f"{idx_path}: corrupt or truncated ({len(idx)} bytes, the header implies {expected})")
        if zlib.crc32(idx[HEADER.size:]) != crc:
            raise DataError(f"{idx_path}: corrupt (checksum mismatch)")
        if self.meta.get("idx_crc32") != crc:
            raise DataError(f"{json_path}: belongs to another {idx_path.name} (checksum differs)")
        size = bin_path.stat().st_size
        if size != bin_bytes:
            raise DataError(f"{bin_path}: {size} bytes, but {idx_path.name} says {bin_bytes} (truncated or replaced)")

        def arr(dtype, count, at):
            return np.frombuffer(idx, dtype, count, at), at + count * np.dtype(dtype).itemsize

        at = HEADER.size
        self.offsets, at = arr(np.int64, n, at)
        self.lengths, at = arr(np.int32, n, at)
        self.prompt_lens, at = arr(np.int32, n, at)
        self.rows, at = arr(np.int64, n, at)
        self.pack_starts, at = arr(np.int64, packs + 1 if packs else 0, at)
        self.pack_samples, at = arr(np.int64, in_packs, at)
        self.dtype = np.dtype(np.uint16 if itemsize == 2 else np.uint32)
        self.bin = np.memmap(bin_path, np.uint8, mode="r") if bin_bytes else np.zeros(0, np.uint8)
        self.packs = packs

    def __len__(self) -> int:
        return len(self.lengths)

    def sample(self, i: int, limit: int | None = None) -> Sample:
        """Sample i, cut to its first `limit` tokens if given."""
        off, n = int(self.offsets[i]), int(self.lengths[i])
        k = n if limit is None else min(n, limit)
        ids = np.frombuffer(self.bin, self.dtype, k, off)
        mask = np.frombuffer(self.bin, np.uint8, k, off + n * self.dtype.itemsize)
        return Sample(ids.tolist(), mask.tolist(), int(self.prompt_lens[i]), int(self.rows[i]))

    def pack(self, p: int) -> Packed:
        return concat([self.sample(int(i)) for i in self.pack_samples[self.pack_starts[p]:self.pack_starts[p + 1]]])
