"""Rows from JSONL, Parquet or a `datasets` save_to_disk folder. Each row remembers where it came
from, so that a bad field found later (at tokenization) is reported as `file:line: field ...`."""
import json
from dataclasses import dataclass
from pathlib import Path


class DataError(ValueError):
    """Bad input data. The message is one line: `file:line: what is wrong`."""


@dataclass
class Row:
    data: dict
    source: str  # "file:LINE" (JSONL, 1-based line) or "file:row N" (0-based row index)


def read_rows(path) -> list[Row]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        rows = _read_datasets_folder(path)
    elif path.suffix in (".jsonl", ".json"):
        rows = _read_jsonl(path)
    elif path.suffix == ".parquet":
        rows = _read_parquet(path)
    else:
        raise DataError(f"{path}: unknown format '{path.suffix}' "
                        "(expected .jsonl, .json lines, .parquet or a datasets folder)")
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def _read_jsonl(path: Path) -> list[Row]:
    # Bytes, so that invalid UTF-8 is reported with its line like any other bad line.
    with open(path, "rb") as f:
        return [parse_jsonl_line(path, lineno, line) for lineno, line in enumerate(f, 1) if line.strip()]


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


def _read_parquet(path: Path) -> list[Row]:
    import pyarrow.parquet as pq
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a corrupt or foreign file
        raise parquet_error(path, e) from None
    return [Row(obj, f"{path}:row {i}") for i, obj in enumerate(table.to_pylist())]


def _read_datasets_folder(path: Path) -> list[Row]:
    return [Row(obj, f"{path}:row {i}") for i, obj in enumerate(open_datasets_folder(path).to_list())]


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
