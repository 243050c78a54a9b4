"""Rows from JSONL, Parquet or a `datasets` save_to_disk folder, read as a stream: the row count
is cheap (JSONL: one scan of the bytes; Parquet: its metadata; datasets: the memory-mapped arrow
table's length) and a reader parses only the rows asked for. Each row remembers where it came
from, so that a bad field found later (at tokenization) is reported as `file:line: field ...`."""
import bisect
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
    stream = RowStream(path)
    return stream.reader().read(range(len(stream)))


class RowStream:
    """An input's rows by index (0-based, blank JSONL lines not counted). `len()` is the row count;
    `reader()` gives a forward-only reader: `read(indices)` with indices ascending across calls."""

    def __init__(self, path):
        self.path = path = Path(path)
        if not path.exists():
            raise DataError(f"{path}: no such file or folder")
        if path.is_dir():
            self._ds = open_datasets_folder(path)
            self._len = len(self._ds)
        elif path.suffix in (".jsonl", ".json"):
            with open(path, "rb") as f:
                self._len = sum(1 for line in f if line.strip())
        elif path.suffix == ".parquet":
            self._len = _parquet_file(path).metadata.num_rows
        else:
            raise DataError(f"{path}: unknown format '{path.suffix}' "
                            "(expected .jsonl, .json lines, .parquet or a datasets folder)")
        if not self._len:
            raise DataError(f"{path}: no rows")

    def __len__(self) -> int:
        return self._len

    def reader(self):
        if self.path.is_dir():
            return _DatasetsReader(self.path, self._ds)
        return _JsonlReader(self.path) if self.path.suffix in (".jsonl", ".json") else _ParquetReader(self.path)


class _JsonlReader:
    def __init__(self, path: Path):
        # Bytes, so that invalid UTF-8 is reported with its line like any other bad line.
        self.path, self._lines, self._next = path, enumerate(open(path, "rb"), 1), 0

    def read(self, indices) -> list[Row]:
        rows = []
        for i in indices:
            for lineno, line in self._lines:  # skipped lines are only scanned for their end, never parsed
                if not line.strip():
                    continue
                index, self._next = self._next, self._next + 1
                if index == i:
                    rows.append(parse_jsonl_line(self.path, lineno, line))
                    break
        return rows


class _ParquetReader:
    def __init__(self, path: Path):
        self.path, self._batches, self._batch, self._start = path, None, None, 0

    def read(self, indices) -> list[Row]:
        import pyarrow as pa
        rows, indices = [], list(indices)
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
                rows += [Row(obj, f"{self.path}:row {i + self._start}")
                         for i, obj in zip(local, self._batch.take(pa.array(local)).to_pylist())]
                k += len(local)
        except Exception as e:  # pyarrow raises several types for a corrupt file
            raise parquet_error(self.path, e) from None
        return rows


class _DatasetsReader:
    def __init__(self, path: Path, ds):
        self.path, self._ds = path, ds

    def read(self, indices) -> list[Row]:
        indices = list(indices)
        if not indices:
            return []
        return [Row(obj, f"{self.path}:row {i}") for i, obj in zip(indices, self._ds.select(indices).to_list())]


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
    return DataError(f"{path}: cannot read Parquet ({_one_line(e)})")


def open_datasets_folder(path: Path):
    """The `datasets.Dataset` of a save_to_disk folder (its 'train' split, or its only one)."""
    import datasets  # imported here: it is slow to import and only this format needs it
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # FileNotFoundError for a folder that is no dataset, others for damage
        raise DataError(f"{path}: cannot load a datasets folder ({_one_line(e)})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" in ds:
            ds = ds["train"]
        elif len(ds) == 1:
            ds = next(iter(ds.values()))
        else:
            raise DataError(f"{path}: several splits {sorted(ds)} and none is 'train'")
    return ds


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())
