"""The tools' end of run on rank 0: shard files merged in input order without holding the rows, and
summaries accumulated in one pass over the merged file, checked against direct list computations."""
import datetime
import decimal
import json
import math
import random
import sys
import tracemalloc
from collections import Counter
from pathlib import Path

import pytest

from megatron_onpolicy.ddt.score import Z_BINS, summarize
from megatron_onpolicy.data import DataError
from megatron_onpolicy.outputs import (ShardWriter, check_writable, merge_shards, open_shards, read_jsonl,
                                       settings_path, shard_files, shard_path, share_files, write_jsonl_atomic,
                                       write_text_atomic, written_indices)
from tests.dist_utils import run_distributed

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from evaluate import pass_at_k, summarize_eval  # noqa: E402


def write_part(out, rank, size, rows):
    with open(shard_path(out, rank, size), "w", encoding="utf-8") as f:
        for i, row in rows:
            f.write(json.dumps({"index": i, "row": row}) + "\n")


def payload(i, size=16):
    return {"text": f"row {i} " + "x" * size, "n": i}


def test_merge_two_layouts_out_of_order(tmp_path):
    # A 2-rank run wrote part of its shares (the windows sorted by length, so not in index order),
    # then a 3-rank restart wrote the rest, one row again.
    out = tmp_path / "out.jsonl"
    write_part(out, 0, 2, [(4, payload(4)), (0, payload(0))])
    write_part(out, 1, 2, [(3, payload(3)), (1, payload(1))])
    write_part(out, 2, 3, [(5, payload(5)), (2, payload(2)), (4, {"text": "later copy"})])
    with merge_shards(out, 6, out, "row"):
        assert [json.loads(line) for line in out.read_text().splitlines()] == [payload(i) for i in range(6)]
        assert len(shard_files(out)) == 3  # until what derives from the merged file is written
    assert shard_files(out) == []


def test_a_restart_reads_only_the_files_that_can_hold_its_share(tmp_path):
    # Runs of 2, 3 and 4 ranks each wrote their whole shares of 60 rows; a file of another name
    # (copied in by hand) is read by every rank.
    out = tmp_path / "out.jsonl"
    for size in (2, 3, 4):
        for rank in range(size):
            write_part(out, rank, size, [(i, payload(i)) for i in range(rank, 60, size)])
    odd = out.with_name(out.name + ".part-x-of-y")
    odd.write_text(json.dumps({"index": 7}) + "\n")
    for size in range(1, 7):
        for rank in range(size):
            every = {i for i in written_indices(shard_files(out)) if i % size == rank}
            read = share_files(out, rank, size)
            assert {i for i in written_indices(read) if i % size == rank} == every
            assert odd in read
    same_layout = set(share_files(out, 1, 3)) - {*(shard_path(out, k, s) for s in (2, 4) for k in range(s)), odd}
    assert same_layout == {shard_path(out, 1, 3)}  # gcd(2, 3) = gcd(4, 3) = 1: every file of those layouts
    assert set(share_files(out, 3, 4)) == {shard_path(out, 1, 2), *(shard_path(out, k, 3) for k in range(3)),
                                           shard_path(out, 3, 4), odd}


def _open_twice(rank, world, out):
    """A run that wrote row 0 and stopped, then three restarts: with its settings, with others,
    and (once the shards are merged away) with others again, which start afresh."""
    writer, done, _ = open_shards(out, 0, 1, True, "cpu", {"model": "m", "temperature": 0.3, "bounds": (0.3, 0.7)})
    assert not out.parent.exists()  # nothing is written before the first row
    writer.write({"index": 0, "row": payload(0)})
    writer.close()
    _, done, n_done = open_shards(out, 0, 1, True, "cpu", {"model": "m", "temperature": 0.3, "bounds": (0.3, 0.7)})
    assert done == {0} and n_done == 1
    with pytest.raises(DataError) as error:
        open_shards(out, 0, 1, True, "cpu", {"model": "m", "temperature": 1.0, "bounds": (0.3, 0.7), "new": 1})
    with merge_shards(out, 1, out.with_name("merged.jsonl"), "row"):
        pass
    assert not settings_path(out).exists()
    writer, done, _ = open_shards(out, 0, 1, True, "cpu", {"model": "m", "temperature": 1.0})
    writer.write({"index": 0, "row": payload(0)})
    writer.close()
    assert error.value.every_rank  # agreed, so printed once (by rank 0)
    return str(error.value), done, json.loads(settings_path(out).read_text())


def test_a_restart_with_other_settings_is_an_error(tmp_path):
    out = tmp_path / "shards" / "out.jsonl"  # a folder the first run makes
    error, done, kept = run_distributed(_open_twice, 1, out)
    assert error == (f"{out}: its rows so far were made with other settings (new None -> 1; temperature 0.3 -> 1.0): "
                     "rerun with those, or write elsewhere")
    assert done == set() and kept == {"model": "m", "temperature": 1.0}


def _open_one_bad_share(rank, world, out):
    try:
        open_shards(out, rank, world, True, "cpu", {})
    except DataError as e:
        return str(e), e.every_rank
    return None


def test_a_line_that_is_no_row_in_one_ranks_share_stops_every_rank(tmp_path):
    """A restart on the layout that wrote the shards: each rank reads only its own file, so only
    rank 1 finds the damaged line. Every rank raises it alike (before: rank 1 alone, while rank 0
    waited for it in the count of rows done)."""
    out = tmp_path / "out.jsonl"
    write_part(out, 0, 2, [(0, payload(0)), (2, payload(2))])
    write_part(out, 1, 2, [(1, payload(1))])
    with open(shard_path(out, 1, 2), "a") as f:
        f.write("oops\n")
    message, every_rank = run_distributed(_open_one_bad_share, 2, out)
    assert message.startswith(f"{shard_path(out, 1, 2)}:2: not a row") and every_rank


def test_rows_and_small_files_are_on_disk_whole_once_written(tmp_path):
    """write_text_atomic puts a new file in place (a reader of the old one, as `latest` or a
    checkpoint's marker, still reads it whole), not the old one truncated and rewritten; a write
    that fails half way leaves the old file and no stray copy; and a ShardWriter's every row is on
    disk before the next (a kill loses at most the row in progress)."""
    path = tmp_path / "latest"
    path.write_text("iter_0000002")
    with open(path) as reader:
        write_text_atomic(path, "iter_0000004")
        assert reader.read() == "iter_0000002"
    assert path.read_text() == "iter_0000004" and list(tmp_path.iterdir()) == [path]

    def rows():  # a merge that meets a corrupt row half way
        yield {"index": 0}
        raise ValueError("corrupt row")
    with pytest.raises(ValueError, match="corrupt row"):
        write_jsonl_atomic(path, rows())
    assert path.read_text() == "iter_0000004" and list(tmp_path.iterdir()) == [path]
    writer = ShardWriter(tmp_path / "x.part")
    for i in range(3):
        writer.write({"index": i, "row": payload(i)})
        assert list(written_indices([tmp_path / "x.part"])) == list(range(i + 1))
    writer.close()


def test_a_failure_after_the_merge_keeps_the_shards(tmp_path):
    out = tmp_path / "out.jsonl"
    write_part(out, 0, 1, [(0, payload(0)), (1, payload(1))])
    with pytest.raises(OSError):
        with merge_shards(out, 2, out, "row"):
            raise OSError("disk full while writing the summary")
    assert len(shard_files(out)) == 1  # a rerun finds both rows done


def test_missing_row_keeps_the_shards(tmp_path):
    out = tmp_path / "out.jsonl"
    write_part(out, 0, 2, [(0, payload(0)), (2, payload(2))])
    write_part(out, 1, 2, [(1, payload(1))])
    with pytest.raises(RuntimeError, match=r"2 rows missing .*first: \[3, 4\]"):
        with merge_shards(out, 5, out, "row"):
            pass
    assert len(shard_files(out)) == 2 and not out.exists()
    assert len(list(tmp_path.iterdir())) == 2  # no temporary file left either


def test_parquet_values_json_cannot_hold(tmp_path):
    """Dates, times and decimals (Arrow's date, timestamp and decimal columns) are written as ISO
    8601 text and text; a binary column is the row's error, named before any work."""
    row = {"day": datetime.date(2026, 11, 27), "at": datetime.datetime(2026, 11, 27, 9, 5, 1, 250000),
           "price": decimal.Decimal("1.10"), "n": 3}
    check_writable(row, "x.parquet:row 0")
    writer = ShardWriter(tmp_path / "x.part")
    writer.write({"index": 0, "row": row})
    writer.close()
    assert list(read_jsonl(tmp_path / "x.part")) == [{"index": 0, "row": {
        "day": "2026-11-27", "at": "2026-11-27T09:05:01.250000", "price": "1.10", "n": 3}}]
    with pytest.raises(DataError, match=r"^x.parquet:row 4: field 'image': JSON cannot hold a bytes; drop or convert"):
        check_writable({"prompt": "p", "image": b"\x89PNG"}, "x.parquet:row 4")


def test_merge_holds_one_row_at_a_time(tmp_path):
    # 400 rows of 50 kB: the old merge held all 20 MB of them (and their parsed objects) on rank 0.
    out = tmp_path / "big.jsonl"
    n, size = 400, 50_000
    for rank in range(2):
        write_part(out, rank, 2, [(i, payload(i, size)) for i in range(rank, n, 2)])
    tracemalloc.start()
    with merge_shards(out, n, tmp_path / "merged.jsonl", "row"):
        pass
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2_000_000, peak
    assert [r["n"] for r in read_jsonl(tmp_path / "merged.jsonl")] == list(range(n))


def ddt_row(rng, z):
    n = rng.randint(1, 50)
    return {"num_tokens": n, "sum_phi": rng.uniform(-2, 1) * n, "avg_phi": rng.uniform(-2, 1), "z": z,
            "avg_logp": rng.uniform(-3, 0), "avg_entropy": rng.uniform(0, 3)}


def test_summaries_match_direct_computation(tmp_path):
    rng = random.Random(0)
    zs = [*Z_BINS, -math.inf, math.inf, -7.5, 0.0, 2.9, 8.0] + [rng.gauss(0, 3) for _ in range(40)]
    rows = [ddt_row(rng, z) for z in zs]
    got = summarize(iter(rows))  # an iterator: one pass
    n = len(rows)
    edges = (-math.inf, *Z_BINS, math.inf)
    assert got["rows"] == n and got["tokens"] == sum(r["num_tokens"] for r in rows)
    finite = [r for r in rows if math.isfinite(r["z"])]
    assert summarize(finite)["mean_z"] == pytest.approx(sum(r["z"] for r in finite) / len(finite), rel=1e-12)
    for key in ("avg_phi", "avg_logp", "avg_entropy"):
        assert got[f"mean_{key}"] == pytest.approx(sum(r[key] for r in rows) / n, rel=1e-12)
    assert got["token_mean_phi"] == pytest.approx(sum(r["sum_phi"] for r in rows) / got["tokens"], rel=1e-12)
    assert got["share_z_lt_-3"] == sum(r["z"] < -3 for r in rows) / n
    assert list(got["z_histogram"].values()) == [sum(lo <= r["z"] < hi for r in rows) for lo, hi in zip(edges, edges[1:])]
    assert sum(got["z_histogram"].values()) == n - 1  # +inf is in no [lo, hi) bin

    # evaluate's summary: k = 4 samples a row, pass@1/2/4 from each row's count of correct ones.
    eval_rows = [{"num_tokens": [rng.randint(1, 9) for _ in range(4)], "end_reasons": rng.choices(["eos", "max-length"], k=4),
                  "correct": [rng.random() < 0.4 for _ in range(4)], "ddt": [ddt_row(rng, rng.gauss(0, 1)) for _ in range(4)]}
                 for _ in range(12)]
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in eval_rows))
    got = summarize_eval(read_jsonl(path), 4)
    assert got["rows"] == 12 and got["samples"] == 4
    for k in (1, 2, 4):
        assert got[f"pass@{k}"] == pytest.approx(sum(pass_at_k(4, sum(r["correct"]), k) for r in eval_rows) / 12)
    assert got["pass@1"] == pytest.approx(sum(map(sum, (r["correct"] for r in eval_rows))) / 48)
    assert got["mean_num_tokens"] == sum(map(sum, (r["num_tokens"] for r in eval_rows))) / 48
    assert got["end_reasons"] == dict(Counter(e for r in eval_rows for e in r["end_reasons"]))
    assert got["ddt"] == summarize([d for r in eval_rows for d in r["ddt"]])
    ungraded = [dict(r) for r in eval_rows]
    del ungraded[5]["correct"]
    assert not any(key.startswith("pass@") for key in summarize_eval(ungraded, 4))
