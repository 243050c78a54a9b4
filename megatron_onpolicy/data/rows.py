"""Rows from JSONL, Parquet or a `datasets` save_to_disk folder, read as a stream, front to back
once: a reader parses only the rows asked for (JSONL: it scans the others for their end). Each
row remembers where it came from, so that a bad field found later (at tokenization) is reported
as `file:line: field ...`."""
import bisect
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

PARQUET_BATCH = 1024  # rows a Parquet reader decodes at a time (only the wanted ones become Python objects)


class DataError(ValueError):
    """Bad input data. The message is one line: `file:line: what is wrong`. every_rank: raised
    alike by every rank, once they agreed on it (reported once, see cli.run)."""

    def __init__(self, message: str, every_rank: bool = False):
        super().__init__(message)
        self.every_rank = every_rank


@dataclass
class Row:
    data: dict
    source: str  # "file:LINE" (JSONL, 1-based line) or "file:row N" (0-based row index)


def read_rows(path) -> list[Row]:
    """Every row of a small input, as Python objects."""
    return [row for _, row in RowStream(path).reader().read(itertools.count())]


class RowStream:
    """An input's rows by index (0-based, blank JSONL lines not counted). `reader()` gives a
    forward-only reader: `read(indices)` -> [(index, Row)] with indices ascending across calls, up
    to the first index past the end; `exists(i)` looks ahead without reading. `rows` is the row
    count, known from the start for Parquet (its metadata) and datasets folders (the arrow table's
    length), and for JSONL once a reader reached the end: counting first would read the whole file
    once more, on every rank, before any work."""

    def __init__(self, path):
        self.path = path = Path(path)
        self.rows, self._scanned = None, (0, 0)  # JSONL: (rows, bytes) a reader went through so far
        if not path.exists():
            raise DataError(f"{path}: no such file or folder")
        if path.is_dir():
            self._ds = open_datasets_folder(path)
            self.rows = len(self._ds)
        elif path.suffix == ".parquet":
            self.rows = _parquet_file(path).metadata.num_rows
        elif path.suffix not in (".jsonl", ".json"):
            raise DataError(f"{path}: unknown format '{path.suffix}' "
                            "(expected .jsonl, .json lines, .parquet or a datasets folder)")
        elif path.is_file():  # (not a pipe, which can be read once): reads up to its first row
            with open(path, "rb") as f:
                self.rows = None if any(line.strip() for line in f) else 0
        if self.rows == 0:
            raise DataError(f"{path}: no rows")

    def total(self):
        """The row count; for JSONL, until a reader reached the end, an estimate from the rows in the
        bytes read so far (for a progress bar; None for a pipe)."""
        rows, at = self._scanned
        if self.rows is not None or not at:
            return self.rows
        return round(rows * self.path.stat().st_size / at) or None

    def reader(self):
        if self.path.is_dir():
            return _DatasetsReader(self)
        return _JsonlReader(self) if self.path.suffix in (".jsonl", ".json") else _ParquetReader(self)


class _JsonlReader:
    def __init__(self, stream: RowStream):
        # Bytes, so that invalid UTF-8 is reported with its line like any other bad line.
        self.path, self._stream, self._file = stream.path, stream, open(stream.path, "rb")
        self._lines, self._next, self._head = enumerate(self._file, 1), 0, None  # head: (index, lineno, line)
        self._seekable = self._file.seekable()

    def exists(self, i: int) -> bool:
        if self._head is not None and self._head[0] >= i:
            return True
        n = self._next  # (a local: this loop runs once a line of the whole file)
        for lineno, line in self._lines:  # skipped rows are only scanned for their end, never parsed
            if line.strip():
                n += 1
                if n > i:
                    self._next, self._head = n, (n - 1, lineno, line)
                    return True
        self._next, self._head, self._lines = n, None, iter(())  # the end: the count is known
        self._file.close()
        if not n:
            raise DataError(f"{self.path}: no rows")
        self._stream.rows = self._next
        return False

    def read(self, indices) -> list:
        rows = []
        for i in indices:
            if not self.exists(i):
                break
            _, lineno, line = self._head
            self._head = None
            rows.append((i, parse_jsonl_line(self.path, lineno, line)))
        if self._seekable and not self._file.closed:  # (not a pipe; once a call: tell() is a system call)
            self._stream._scanned = self._next, self._file.tell()
        return rows


class _ParquetReader:
    def __init__(self, stream: RowStream):
        self.path, self._n, self._batches, self._batch, self._start = stream.path, stream.rows, None, None, 0

    def exists(self, i: int) -> bool:
        return i < self._n

    def read(self, indices) -> list:
        import pyarrow as pa
        rows, indices = [], list(itertools.takewhile(self.exists, indices))
        try:
            if self._batches is None:
                self._batches = _parquet_file(self.path).iter_batches(batch_size=PARQUET_BATCH)
                self._batch = next(self._batches)
            k = 0
            while k < len(indices):
                while indices[k] >= self._start + len(self._batch):
                    self._start += len(self._batch)
                    self._batch = next(self._batches)
                stop = bisect.bisect_left(indices, self._start + len(self._batch), k)  # (indices ascend)
                local = [i - self._start for i in indices[k:stop]]
                rows += [(i + self._start, Row(obj, f"{self.path}:row {i + self._start}"))
                         for i, obj in zip(local, self._batch.take(pa.array(local)).to_pylist())]
                k += len(local)
        except Exception as e:  # pyarrow raises several types for a corrupt file
            raise parquet_error(self.path, e) from None
        return rows


class _DatasetsReader:
    def __init__(self, stream: RowStream):
        self.path, self._ds = stream.path, stream._ds

    def exists(self, i: int) -> bool:
        return i < len(self._ds)

    def read(self, indices) -> list:
        indices = list(itertools.takewhile(self.exists, indices))
        if not indices:
            return []
        return [(i, Row(obj, f"{self.path}:row {i}")) for i, obj in zip(indices, self._ds.select(indices).to_list())]


def parse_jsonl_line(path, lineno: int, line: bytes) -> Row:
    """One non-blank JSONL line (bytes) -> Row, or the DataError naming its file and line."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{lineno}: not UTF-8 ({e.reason})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
    return Row(obj, f"{path}:{lineno}")


def _parquet_file(path: Path):
    import pyarrow.parquet as pq
    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt or foreign file
        raise parquet_error(path, e) from None


def parquet_error(path, e: Exception) -> DataError:
    return DataError(f"{path}: cannot read Parquet ({one_line(e)})")


def open_datasets_folder(path: Path):
    """The `datasets.Dataset` of a save_to_disk folder (its 'train' split, or its only one)."""
    import datasets  # imported here: it is slow to import and only this format needs it
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # FileNotFoundError for a folder that is no dataset, others for damage
        raise DataError(f"{path}: cannot load a datasets folder ({one_line(e)})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" in ds:
            ds = ds["train"]
        elif len(ds) == 1:
            ds = next(iter(ds.values()))
        else:
            raise DataError(f"{path}: several splits {sorted(ds)} and none is 'train'")
    return ds


def one_line(e: Exception) -> str:
    """An exception's message on one line, for an error line that names it."""
    return " ".join(str(e).split())
