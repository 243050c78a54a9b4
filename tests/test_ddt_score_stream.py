"""Streaming rows (data/rows.py RowStream, data/stream.py): tools/ddt_score.py gives the same rows
and values whatever the window and the number of ranks, from JSONL, Parquet and a datasets folder;
a rank parses only its own share; a restart on another number of ranks keeps what was written;
--keep-keys."""
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_onpolicy.data import DataError, Row, RowStream, read_rows
from megatron_onpolicy.data.stream import share_windows
from megatron_onpolicy.ddt.score import row_keys
from tests.dist_utils import free_port, one_process_group, run_distributed
from tests.test_realign import tiny_model  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parents[1]
TOOL = str(ROOT / "tools" / "ddt_score.py")
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
FLOATS = ("avg_phi", "sum_phi", "z", "avg_logp", "avg_entropy")
N = 11  # rows: odd, so the two ranks' shares differ in size


def load_tool():
    spec = importlib.util.spec_from_file_location("ddt_score_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The same rows as JSONL (with blank lines, which are not rows), Parquet and a datasets folder."""
    tmp = tmp_path_factory.mktemp("data")
    rows = [dict(json.loads(line), id=f"row-{i}", extra={"n": i})
            for i, line in enumerate(open(ROOT / "data" / "math_sft.jsonl")) if i < N]
    (tmp / "d.jsonl").write_text("\n".join(json.dumps(r) + ("\n" if i % 4 == 1 else "") for i, r in enumerate(rows)) + "\n")
    pq.write_table(pa.Table.from_pylist(rows), tmp / "d.parquet", row_group_size=4)
    import datasets
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp / "d.ds"))
    return rows, tmp


def run(ranks, *args):
    cmd = ([DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(free_port()), TOOL] if ranks > 1
           else [sys.executable, TOOL]) + list(args)
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def streamed(tiny_model, data):  # noqa: F811
    rows, tmp = data
    base = ["--model", str(tiny_model), "--micro-batch-size", "2"]
    out = {}
    for name, ranks, data, extra in (("w1", 1, "d.jsonl", ["--window", "1"]),
                                     ("w3", 1, "d.ds", ["--window", "3", "--keep-keys", "id"]),
                                     ("all", 2, "d.parquet", ["--window", "0"])):
        if name == "all":  # a killed 3-rank run left these rows (one line torn); their values are planted
            (tmp / "all.jsonl.part-00001-of-00003").write_text(
                "".join(json.dumps({"index": i, "row": dict(out["w1"][i], avg_phi=100.0 + i)}) + "\n" for i in (1, 4, 10))
                + '{"index": 7, "row": {"avg_ph')
        result = run(ranks, *base, "--data", str(tmp / data), "--out", str(tmp / f"{name}.jsonl"), *extra)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        (tmp / f"{name}.log").write_text(result.stdout + result.stderr)
        out[name] = [json.loads(line) for line in open(tmp / f"{name}.jsonl")]
        assert not list(tmp.glob(f"{name}.jsonl.part-*")), "shard files left behind"
    return rows, out, tmp


def test_same_rows_and_values_at_any_window_and_rank_count(streamed):
    rows, out, _ = streamed
    scores = row_keys()
    for name, got in out.items():
        assert [r["index"] for r in got] == list(range(N)), name
    for row, w1, w3, full in zip(rows, out["w1"], out["w3"], out["all"]):
        assert {k: w1[k] for k in row} == row  # every input field, by default
        assert set(w1) == set(row) | set(scores)
        assert set(w3) == {"id"} | set(scores) and w3["id"] == row["id"]  # --keep-keys id
        for other in (w3, full):
            assert other["num_tokens"] == w1["num_tokens"] and other["index"] == w1["index"]
            if other is full and w1["index"] in (1, 4, 10):
                continue
            for key in FLOATS:  # batches differ (window 1: one row each): padding changes the last bits only
                assert other[key] == pytest.approx(w1[key], rel=1e-5, abs=1e-6), key


def test_restart_on_another_rank_count_keeps_what_was_written(streamed):
    _, out, tmp = streamed
    # Rows 1, 4, 10 came from the 3-rank shard file (not recomputed, not duplicated); the torn row 7 was redone.
    assert [out["all"][i]["avg_phi"] for i in (1, 4, 10)] == [101.0, 104.0, 110.0]
    assert out["all"][7]["avg_phi"] == pytest.approx(out["w1"][7]["avg_phi"], rel=1e-5)
    # Both ranks read the 3-rank file; each counts its own share only (rank 0: 4, 10; rank 1: 1),
    # so the progress bar starts at 3 rows done, not at 3 a rank.
    log = (tmp / "all.log").read_text()
    assert re.findall(r"ddt_score: .*?\| *(\d+)/11 ", log)[0] == "3", log[-3000:]


def test_a_rank_parses_only_its_share(tiny_model, tmp_path):  # noqa: F811
    lines = [json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) for i in range(6)]
    lines[1] = lines[2] = '{"prompt": "q", "response": '  # index 1: rank 1's share; index 2: rank 0's
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    result = run(2, "--model", str(tiny_model), "--data", str(tmp_path / "bad.jsonl"), "--out",
                 str(tmp_path / "o.jsonl"), "--window", "2")
    errors = [line for line in result.stderr.splitlines() if line.startswith("ddt_score: error:")]
    assert result.returncode != 0
    # Rank 0, first by rank, names line 3: it never parsed line 2 (rank 1's), the first bad line of the file.
    assert len(errors) == 1 and "bad.jsonl:3: invalid JSON" in errors[0], result.stderr[-3000:]
    assert not list(tmp_path.glob("o.jsonl*")), "nothing written"


def test_a_missing_input_is_one_error_line(tiny_model, tmp_path):  # noqa: F811
    """Every rank has the error: rank 0 prints it, once (before: a line a rank)."""
    missing = tmp_path / "nope.jsonl"
    result = run(2, "--model", str(tiny_model), "--data", str(missing), "--out", str(tmp_path / "o.jsonl"))
    errors = [line for line in result.stderr.splitlines() if line.startswith("ddt_score: error")]
    assert result.returncode != 0
    assert errors == [f"ddt_score: error: {missing}: no such file or folder (on {socket.gethostname()})"], \
        result.stderr[-3000:]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "ds"])
def test_reader_parses_only_the_rows_asked_for(data, fmt):
    rows, tmp = data
    stream = RowStream(tmp / f"d.{fmt}")
    assert stream.rows == (None if fmt == "jsonl" else N)  # JSONL: not counted before it is read
    assert [r.data for r in read_rows(tmp / f"d.{fmt}")] == rows
    reader = stream.reader()
    got = reader.read([2, 3]) + reader.read([]) + reader.read([7, 10])  # forward across calls, across row groups
    assert 0.5 * N < stream.total() < 2 * N  # JSONL: estimated from the bytes read so far
    assert [(i, r.data) for i, r in got] == [(i, rows[i]) for i in (2, 3, 7, 10)]
    if fmt == "jsonl":
        assert got[0][1].source.endswith("d.jsonl:4")  # the blank line after row 1 counts as a line, not a row
    else:
        assert got[0][1].source.endswith(f"d.{fmt}:row 2")
    # Past the end: read stops at the first missing index, and the count is known.
    assert reader.read([N, N + 1]) == [] and not reader.exists(N) and stream.rows == stream.total() == N


@pytest.mark.timeout(30)  # a reader that never moves past a batch's end loops forever
def test_parquet_reader_at_batch_boundaries(tmp_path, monkeypatch):
    """Batches of 4 rows: row 4 starts the second batch, rows 8 and 9 the third."""
    from megatron_onpolicy.data import rows as rows_module
    monkeypatch.setattr(rows_module, "PARQUET_BATCH", 4)
    written = [{"a": i, "s": f"r{i}"} for i in range(10)]
    pq.write_table(pa.Table.from_pylist(written), tmp_path / "x.parquet", row_group_size=3)
    reader = RowStream(tmp_path / "x.parquet").reader()
    assert [r.data for _, r in reader.read([4])] == [written[4]]
    assert [r.data for _, r in reader.read([8, 9])] == written[8:]
    assert [r.data for _, r in RowStream(tmp_path / "x.parquet").reader().read(range(10))] == written
    assert [r.data for _, r in RowStream(tmp_path / "x.parquet").reader().read([3, 4, 7, 8])] == \
        [written[i] for i in (3, 4, 7, 8)]


def test_jsonl_reader_skips_bad_lines_it_does_not_read(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"a": 0}\nnot json\n\n{"a": 2}\n')
    stream = RowStream(tmp_path / "x.jsonl")
    assert [r.data for _, r in stream.reader().read([0, 2])] == [{"a": 0}, {"a": 2}]
    with pytest.raises(DataError, match=r"x.jsonl:2: invalid JSON"):
        stream.reader().read([1])
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    with pytest.raises(DataError, match=r"blank.jsonl: no rows"):  # at once, not after a tool loaded its model
        RowStream(tmp_path / "blank.jsonl")


def test_keep_keys_never_clobbers_a_field():
    kept_fields = load_tool().kept_fields
    scores = set(row_keys())
    row = Row({"prompt": "p", "response": "r", "z": 1.0}, "f.jsonl:3")
    with pytest.raises(DataError, match="f.jsonl:3: field 'z' has the name of a score"):
        kept_fields(row, None, scores)
    assert kept_fields(row, ["prompt"], scores) == {"prompt": "p"}
    assert kept_fields(row, [], scores) == {}
    with pytest.raises(DataError, match="f.jsonl:3: field 'id' .* missing"):
        kept_fields(row, ["id"], scores)


def _share_worker(rank, world_size, path, bad):
    """Each rank's yielded indices per window (0 and 2), then what a DataError in `prepare` on rank 1
    only does: every rank's outcome, gathered to rank 0."""
    import torch.distributed as dist
    got = {}
    for w in (0, 2):
        stream = RowStream(path)
        got[w] = [list(items) for items in share_windows(stream, rank, world_size, w, set(), lambda i, row: i, "cpu")]
        got[w, "rows"] = stream.rows

    def prepare(i, row):
        if rank == 1 and i == bad:
            raise DataError(f"{row.source}: planted")
        return i
    try:
        outcome = list(share_windows(stream, rank, world_size, 2, set(), prepare, "cpu"))
    except DataError as e:
        outcome = str(e)
    everything = [None] * world_size
    dist.all_gather_object(everything, (got, outcome))
    return everything


def test_share_windows_cover_every_row_once_and_any_rank_error_stops_all(tmp_path):
    # 5 rows on 2 ranks: rank 0's share (0, 2, 4) is longer than rank 1's (1, 3); a share length rounded
    # down would leave row 4 unread.
    (tmp_path / "x.jsonl").write_text("".join(json.dumps({"a": i}) + "\n" for i in range(5)))
    everything = run_distributed(_share_worker, 2, tmp_path / "x.jsonl", 3)
    for window, windows in ((0, 1), (2, 2)):
        per_rank = [got[window] for got, _ in everything]
        assert [len(w) for w in per_rank] == [windows, windows]  # same window count on every rank (collectives)
        assert sorted(i for w in per_rank for items in w for i in items) == list(range(5)), (window, per_rank)
        assert [got[window, "rows"] for got, _ in everything] == [5, 5]  # counted on the way, by every rank
    # Row 3 (JSONL line 4) is bad on rank 1 only: both ranks raise its message, not only rank 1.
    assert [outcome for _, outcome in everything] == [f"{tmp_path / 'x.jsonl'}:4: planted"] * 2


@pytest.mark.timeout(60)  # a reader that reads the input twice waits forever on the emptied pipe
def test_an_input_is_read_once_front_to_back(tmp_path):
    """No rank counts a JSONL input's rows before working (one more pass over the file, at every
    start): a named pipe, which can be read once only, gives every row, and the count after."""
    pipe = tmp_path / "rows.jsonl"
    os.mkfifo(pipe)
    lines = [json.dumps({"a": i}) + "\n" for i in range(7)]
    writer = threading.Thread(target=lambda: pipe.write_text("".join(lines[:3]) + "\n" + "".join(lines[3:])))
    writer.start()
    stream = RowStream(pipe)
    assert stream.total() is None
    with one_process_group():
        windows = [[(i, row.data["a"], row.source) for i, row in items]
                   for items in share_windows(stream, 0, 1, 2, {4}, lambda i, row: (i, row), "cpu")]
    writer.join()
    assert windows == [[(0, 0, f"{pipe}:1"), (1, 1, f"{pipe}:2")], [(2, 2, f"{pipe}:3"), (3, 3, f"{pipe}:5")],
                       [(5, 5, f"{pipe}:7")], [(6, 6, f"{pipe}:8")]], windows  # row 4 was done
    assert stream.rows == 7
