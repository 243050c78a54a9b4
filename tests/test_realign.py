"""tools/realign_distributed.py: sharded hinted decoding that survives a killed rank."""
import importlib.util
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import transformers

from megatron_onpolicy.data import DataError
from megatron_onpolicy.generate.answers import answers_match, final_answer
from megatron_onpolicy.model.hub import resolve_model_path
from megatron_onpolicy.outputs import ShardWriter, _line_table, _rows_in_order, cut_torn_line, json_line, written_indices
from tests.dist_utils import free_port

ROOT = Path(__file__).resolve().parents[1]
TOOL = str(ROOT / "tools" / "realign_distributed.py")
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny random Llama with the real SmolLM2 tokenizer and chat template."""
    folder = tmp_path_factory.mktemp("tiny")
    tok = transformers.AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m"))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                      eos_token_id=tok.eos_token_id, max_position_embeddings=1024)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def data_file(tmp_path, n):
    rows = [json.loads(line) for line in open(ROOT / "data" / "math_sft.jsonl")][:n]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def complete_lines(folder):
    n = 0
    for part in Path(folder).glob("*.part-*"):
        for line in part.read_bytes().splitlines(keepends=True):
            try:
                json.loads(line)
                n += line.endswith(b"\n")
            except ValueError:
                pass
    return n


def wait_for_rows(folder, n, procs) -> None:
    """Until the shard files in `folder` hold n finished rows, while every process of `procs` runs."""
    deadline = time.time() + 300
    while complete_lines(folder) < n:
        assert all(p.poll() is None for p in procs) and time.time() < deadline, "the run ended before its rows"
        time.sleep(0.02)


def kill_a_rank(cmd, folder, tool) -> int:
    """Run `cmd` (a 2-rank deepspeed launch of `tool`), SIGKILL one rank once its shard files in
    `folder` hold 2 finished rows; -> the launcher's exit status."""
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_rows(folder, 2, [first])
    ranks = [p for p in psutil.Process(first.pid).children(recursive=True)
             if tool in p.cmdline() and "deepspeed.launcher.launch" not in p.cmdline()]
    assert len(ranks) == 2, [p.cmdline() for p in ranks]
    ranks[0].send_signal(signal.SIGKILL)
    first.communicate(timeout=120)
    return first.returncode


def test_killed_rank_restart_loses_and_repeats_nothing(tiny_model, tmp_path):
    data, rows = data_file(tmp_path, 48)
    out = tmp_path / "out"
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), TOOL, "--model", str(tiny_model),
           "--data", str(data), "--out-dir", str(out), "--max-new-tokens", "64", "--batch-size", "1", "--temperature", "0.3"]
    assert kill_a_rank(cmd, out / "shards", TOOL) != 0
    assert not (out / "realigned.jsonl").exists()
    done_before = complete_lines(out / "shards")
    assert 2 <= done_before < len(rows)

    second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"resuming: {done_before} rows already done" in second.stdout
    final = [json.loads(line) for line in open(out / "realigned.jsonl")]
    assert [r["prompt"] for r in final] == [r["prompt"] for r in rows]  # every row once, input order
    for got, row in zip(final, rows):
        assert {k: got[k] for k in row} == row
        assert got["end_reason"] in ("eos", "max-length", "repeating")
        assert 0 <= got["mean_lam"] <= 1 and 0 < got["num_tokens"] <= 64
        assert isinstance(got["answer_match"], bool)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"] == len(rows) and sum(summary["end_reasons"].values()) == len(rows)
    assert not list((out / "shards").glob("*.part-*"))


def hf_avg_phi(model, tokenizer, prompt, response, eos):
    """Mean phi = log p_y + H over the response tokens (+ EOS), from one transformers forward."""
    prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                               tokenize=True)
    prompt_ids = list(prompt_ids["input_ids"] if hasattr(prompt_ids, "keys") else prompt_ids)  # transformers 5 / 4
    response_ids = tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id] * eos
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logp = model(ids).logits[0, len(prompt_ids) - 1:-1].double().log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return float((logp.gather(-1, ids[0, len(prompt_ids):, None])[:, 0] + entropy).mean())


def test_filtered_output_and_template_errors(tiny_model, tmp_path):
    data, rows = data_file(tmp_path, 6)
    bad_template = tmp_path / "bad.txt"
    bad_template.write_text("Only {question} here.")
    base = [sys.executable, TOOL, "--model", str(tiny_model), "--data", str(data), "--max-new-tokens", "8"]
    run = lambda *extra: subprocess.run(base + list(extra), cwd=ROOT, capture_output=True, text=True, timeout=300)
    plain = run("--out-dir", str(tmp_path / "plain"))
    assert plain.returncode == 0, plain.stderr[-3000:]
    merged = [json.loads(line) for line in open(tmp_path / "plain" / "realigned.jsonl")]
    # A random model never says EOS within 8 tokens: every row was cut, and by default none is kept.
    assert {r["end_reason"] for r in merged} == {"max-length"}
    assert (tmp_path / "plain" / "realigned.filtered.jsonl").read_text() == ""
    # Cut text is scored without an EOS target.
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tiny_model)
    for r in merged:
        without_eos, with_eos = (hf_avg_phi(hf, tok, r["prompt"], r["realigned"], eos) for eos in (False, True))
        # An EOS target moves the average by (phi_eos - avg) / (n + 1), small for some samples:
        # the score must be ten times nearer the EOS-free reference than the other.
        assert r["avg_phi_realigned"] == pytest.approx(without_eos, abs=1e-4)
        assert abs(r["avg_phi_realigned"] - with_eos) > 10 * abs(r["avg_phi_realigned"] - without_eos), r
        # The original response is the input's whole answer: scored with its EOS target.
        assert r["avg_phi_original"] == pytest.approx(hf_avg_phi(hf, tok, r["prompt"], r["response"], True), abs=1e-4)

    threshold = sorted(r["avg_phi_realigned"] for r in merged)[len(merged) // 2]
    kept_run = run("--out-dir", str(tmp_path / "kept"), f"--min-avg-phi={threshold}", "--keep-unfinished")
    assert kept_run.returncode == 0, kept_run.stderr[-3000:]
    assert [json.loads(line) for line in open(tmp_path / "kept" / "realigned.jsonl")] == merged  # same seed
    kept = [json.loads(line) for line in open(tmp_path / "kept" / "realigned.filtered.jsonl")]
    assert kept == [r for r in merged if r["avg_phi_realigned"] >= threshold]
    assert 0 < len(kept) < len(merged)
    assert json.loads((tmp_path / "kept" / "summary.json").read_text())["filtered_rows"] == len(kept)

    bad = run("--out-dir", str(tmp_path / "bad"), "--hint-template", str(bad_template))
    assert bad.returncode != 0
    assert "realign_distributed: error:" in bad.stderr and "{answer}" in bad.stderr and "bad.txt" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_rows_it_cannot_realign_stop_the_run_by_name(tiny_model, tmp_path):
    """Checked with the rest of a row before any decoding: a messages row (it has no reference
    answer field), a column the output cannot copy. Both used to fail only at the row's turn to be
    written, on its writer rank alone, and without naming the row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data, rows = data_file(tmp_path, 3)
    lines = data.read_text().splitlines(keepends=True)
    data.write_text(lines[0] + json.dumps({"messages": [{"role": "user", "content": "1 + 1?"},
                                                        {"role": "assistant", "content": "2"}]}) + "\n" + lines[1])
    parquet = tmp_path / "data.parquet"
    pq.write_table(pa.table({"prompt": [r["prompt"] for r in rows], "response": [r["response"] for r in rows],
                             "image": [b"\x89PNG"] * 3}), parquet)
    for path, error in ((data, f"{data}:2: field 'prompt' missing (realignment rewrites"),
                        (parquet, f"{parquet}:row 0: field 'image': JSON cannot hold a bytes")):
        out = tmp_path / f"out-{path.suffix[1:]}"
        run = subprocess.run([sys.executable, TOOL, "--model", str(tiny_model), "--data", str(path),
                              "--max-new-tokens", "4", "--out-dir", str(out)],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert run.returncode != 0
        assert f"realign_distributed: error: {error}" in run.stderr, run.stderr[-2000:]
        assert not list(out.rglob("*.part-*"))


def load_tool(tool):
    spec = importlib.util.spec_from_file_location(f"{tool}_tool", ROOT / "tools" / f"{tool}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("tool, required", [("realign_distributed", ["--out-dir", "x"]), ("evaluate", ["--out", "x"])])
@pytest.mark.parametrize("flags, error", [
    (["--temperature", "-1"], "--temperature must be >= 0 (0: greedy), got -1.0"),
    (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
])
def test_bad_generation_flags_are_one_line_errors_before_the_model_loads(tool, required, flags, error, capsys):
    with pytest.raises(SystemExit):
        load_tool(tool).parse_args(["--data", "x.jsonl", *required, *flags])
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f"error: {error}")


def test_rows_the_tools_would_mangle_are_errors(capsys):
    """A field named like an output (a file the tool wrote, given again) would be overwritten; an
    answer that is no value would be graded as the text 'None'; --require-answer-match without
    the answer would drop every row. An empty rewrite is not a row to train on. And k greedy
    completions are one completion k times."""
    from megatron_onpolicy.data import DataError, Row

    realign, evaluate = load_tool("realign_distributed"), load_tool("evaluate")
    args = realign.parse_args(["--data", "x", "--out-dir", "x", "--require-answer-match"])
    row = {"prompt": "1 + 1?", "response": "2", "answer": "2"}
    realign.check_row(Row(row, "x:1"), args)
    for bad, error in (({**row, "realigned": "an earlier rewrite"}, "x:1: field 'realigned' has the name of an output"),
                       ({"prompt": "1 + 1?", "response": "2"}, "x:1: field 'answer' missing (--require-answer-match")):
        with pytest.raises(DataError, match=error.replace("(", r"\(")):
            realign.check_row(Row(bad, "x:1"), args)
    for bad, error in (({**row, "answer": None}, "x:1: field 'answer' must be a string or a number, got None"),
                       ({**row, "answer": ["2"]}, r"x:1: field 'answer' must be a string or a number, got \['2'\]"),
                       ({**row, "x": float("nan")}, "x:1: field 'x': Out of range float values are not JSON")):
        with pytest.raises(DataError, match=error):  # (as evaluate's; NaN: what Python's json reads)
            realign.check_row(Row(bad, "x:1"), realign.parse_args(["--data", "x", "--out-dir", "x"]))
    assert not realign.keep({"realigned": " ", "end_reason": "eos", "avg_phi_realigned": None}, args)
    args = evaluate.parse_args(["--data", "x", "--out", "x"])
    assert evaluate.question_and_answer(Row(row, "x:1"), args) == ("1 + 1?", "2")
    for bad, error in (({**row, "answer": None}, "x:1: field 'answer' must be a string or a number, got None"),
                       ({**row, "correct": [True]}, "x:1: field 'correct' has the name of an output field")):
        with pytest.raises(DataError, match=error):
            evaluate.question_and_answer(Row(bad, "x:1"), args)
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--data", "x", "--out", "x", "--samples", "4"])
    assert "--samples 4 needs --temperature > 0" in capsys.readouterr().err
    for tool, argv, error in (
            (evaluate, ["--out", str(ROOT)], f"--out {ROOT} is a folder; it must be a file"),
            (evaluate, ["--out", "x", "--temperature", "nan"], "argument --temperature: invalid finite value: 'nan'"),
            (realign, ["--out-dir", __file__], f"--out-dir {__file__} is a file; it must be a folder"),
            (realign, ["--out-dir", "x", "--beta", "inf"], "argument --beta: invalid finite value: 'inf'")):
        with pytest.raises(SystemExit):  # an output of the wrong kind, a setting that is no number
            tool.parse_args(["--data", "x", *argv])
        assert capsys.readouterr().err.strip().endswith(error)


@pytest.mark.parametrize("flags, kept", [
    ([], "abeh"),
    (["--require-answer-match"], "aeh"),
    (["--keep-unfinished"], "abdeh"),
    (["--min-avg-phi", "-1"], "abh"),  # at the threshold is kept
    (["--require-answer-match", "--keep-unfinished", "--min-avg-phi", "-1"], "adh"),
])
def test_the_filtered_file_keeps_what_the_flags_allow(flags, kept):
    """realigned.filtered.jsonl (the file to train on) and summary.json's counts, row by row."""
    realign = load_tool("realign_distributed")
    args = realign.parse_args(["--data", "x", "--out-dir", "x", *flags])
    row = lambda text, end, phi, match: {"realigned": text, "end_reason": end, "num_tokens": 3, "mean_lam": 0.5,
                                         "avg_phi_original": -1.5, "avg_phi_realigned": phi, "answer_match": match}
    rows = {"a": row("x = 2", "eos", 0.5, True), "b": row("x = 3", "eos", 0.5, False),
            "d": row("x = 2, and", "max-length", 0.5, True), "e": row("x = 2", "eos", -2.0, True),
            "g": row(" ", "eos", None, False), "h": row("x = 2", "eos", -1.0, True)}
    assert "".join(name for name, r in rows.items() if realign.keep(r, args)) == kept
    summary = realign.summarize(rows.values(), args)
    assert (summary["rows"], summary["filtered_rows"], summary["end_reasons"]) == (6, len(kept),
                                                                                 {"eos": 5, "max-length": 1})
    assert summary["answer_match_rate"] == pytest.approx(4 / 6)
    assert summary["mean_avg_phi_realigned"] == pytest.approx((0.5 + 0.5 + 0.5 - 2.0 - 1.0) / 5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error of a machine without CUDA")
@pytest.mark.parametrize("tool, required", [("realign_distributed", ["--out-dir", "x"]), ("evaluate", ["--out", "x"])])
def test_cuda_graph_needs_a_cuda_device(tool, required, capsys):
    module = load_tool(tool)
    module.parse_args(["--data", "x.jsonl", *required])
    with pytest.raises(SystemExit):
        module.parse_args(["--data", "x.jsonl", *required, "--cuda-graph"])
    assert "--cuda-graph needs a CUDA device" in capsys.readouterr().err


def test_shard_writer_cuts_a_torn_line(tmp_path):
    part = tmp_path / "x.part"
    part.write_text('{"index": 0, "row": {}}\n{"index": 1, "ro')
    writer = ShardWriter(part)
    writer.write({"index": 1, "row": {}})
    writer.close()
    assert [json.loads(line)["index"] for line in open(part)] == [0, 1]
    part.write_bytes(part.read_bytes() + b'{"index": 2, "row": {"a": "x' + b"y" * 70000)  # torn past 64 KiB
    cut_torn_line(part)
    assert list(written_indices([part])) == [0, 1]


def test_a_zero_filled_line_is_redone_and_a_line_that_is_no_row_is_named(tmp_path, capsys):
    """A node lost mid-write can leave zero-filled pages before a later line's newline: such a line
    is skipped, so the rows in it are redone, also where it starts like a row (here row 1's start,
    whose newline and row 2's start the zeros swallowed; it was taken for row 1, and the merge then
    failed on it). A line that is no row otherwise stops the resume and the merge, by file and line."""
    part = tmp_path / "x.part"

    def row(obj) -> bytes:
        return json_line(obj).encode()
    part.write_bytes(row({"index": 0, "row": {}}) + b"\0" * 30 + b"\n" + row({"index": 1, "row": {"a": "b"}})[:12]
                     + b"\0" * 40 + row({"index": 2, "row": {}})[12:] + row({"index": 3, "row": {}}))
    assert list(written_indices([part])) == [0, 3]
    assert f"{part}:2: skipped, zero-filled" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match=r"2 rows missing .*\[1, 2\]"):
        _line_table([part], 4)
    with open(part, "ab") as f:  # as the rerun appends them
        f.write(row({"index": 2, "row": {}}) + row({"index": 1, "row": {"a": "b"}}))
    assert list(_rows_in_order([part], *_line_table([part], 4))) == [
        {"index": 0, "row": {}}, {"index": 1, "row": {"a": "b"}}, {"index": 2, "row": {}}, {"index": 3, "row": {}}]

    part.write_bytes(row({"index": 0, "row": {}}) + b"oops\n" + row({"index": 2, "row": {}}))
    for read in (lambda: list(written_indices([part])), lambda: _line_table([part], 3)):
        with pytest.raises(DataError, match=rf"{part}:2: not a row .*sed -i '2d'"):
            read()
    subprocess.run(["sed", "-i", "2d", str(part)], check=True)  # as the error says
    assert list(written_indices([part])) == [0, 2]


def test_final_answer_extraction():
    assert final_answer("so \\boxed{\\frac{1}{2}} done") == "\\frac{1}{2}"
    assert final_answer("first 3, then 1,250 apples") == "1,250"
    assert answers_match("The answer is \\boxed{1,250.}", "1250")
    assert answers_match("We get 12.0 in the end.", "12")
    assert not answers_match("The answer is \\boxed{13}", "12")
    assert not answers_match("no answer \\boxed{12", "12") or final_answer("no answer \\boxed{12") == "12"
