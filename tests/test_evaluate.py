"""tools/evaluate.py: answer grading, pass@k, T = 1 vs T = 3 on the real model, a killed run resumed, a
signalled run stopped for requeue."""
import itertools
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from megatron_onpolicy.generate.answers import answers_match, final_answer, normalize
from megatron_onpolicy.model.hub import resolve_model_path
from megatron_onpolicy.preempt import REQUEUE_EXIT
from tests.dist_utils import free_port
from tests.test_realign import complete_lines, kill_a_rank, tiny_model, wait_for_rows  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parents[1]
TOOL = str(ROOT / "tools" / "evaluate.py")
DEEPSPEED, TORCHRUN = (str(Path(sys.executable).parent / name) for name in ("deepspeed", "torchrun"))
sys.path.insert(0, str(ROOT / "tools"))
from evaluate import parse_args, pass_at_k, summarize_eval  # noqa: E402

GRADING = [  # (solution text, reference answer, graded correct)
    ("so \\boxed{\\frac{1}{2}} done", "0.5", True),          # nested braces, fraction == decimal
    ("\\boxed{\\dfrac{3}{4}}", "3/4", True),
    ("It is 3/4 of the cake.", "0.75", True),                 # last number, a plain fraction
    ("first 3, then 1,250 apples", "1250", True),            # thousands comma, not a list comma
    ("total 1,000,000 cm", "1000000", True),
    ("The answer is \\boxed{1,250.}", "1250", True),          # trailing period
    ("We get 12.0 in the end.", "12", True),
    ("costs $12.50.", "12.5", True),
    ("\\boxed{12 \\text{ dollars}}", "12", True),             # trailing units
    ("\\boxed{5 cm}", "5", True),
    ("\\boxed{\\$5}", "$5", True),
    ("\\boxed{50\\%}", "50", True),
    ("\\boxed{90^\\circ}", "90", True),
    ("\\boxed{12 square feet}", "12", True),
    ("\\boxed{5cm}", "5", True),
    ("\\boxed{12{,}000}", "12000", True),                   # LaTeX's thousands comma
    ("\\boxed{2x}", "2", False),                            # a variable, not a unit
    ("\\boxed{2x^2}", "2", False),
    ("\\boxed{1e3}", "1", False),
    ("\\boxed{1 million}", "1", False),                    # words that scale the number
    ("\\boxed{3 hundred}", "3", False),
    ("\\boxed{6 pi}", "6", False),
    ("\\boxed{6pi}", "6", False),
    ("\\boxed{10 sqrt2}", "10", False),
    ("\\boxed{5 million dollars}", "5", False),
    ("\\boxed{4 pints}", "4", True),                       # a unit that starts like one
    ("\\boxed{\\frac12}", "1/2", True),                    # LaTeX's one-digit shorthand
    ("\\boxed{-\\frac34}", "-0.75", True),
    ("\\boxed{0.5}", ".5", True),                          # no leading zero
    ("the answer is .25", "1/4", True),
    ("\\boxed{1} or rather \\boxed{2}", "2", True),           # several boxes: the last
    ("\\boxed{1} or rather \\boxed{2}", "1", False),
    ("\\boxed{-7}", "-7", True),
    ("\\boxed{-7}", "7", False),
    ("\\boxed{12}", "12.5", False),
    ("\\boxed{x^{2}+1}", "x^{2} + 1", True),                  # not a number: compared as text
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{\\sqrt{2}}{2}", True),
    ("the box is cut \\boxed{12", "12", True),                # unclosed box: the last number
    ("no number at all", "0", False),
    ("so 1/0 it is", "2", False),                             # a zero denominator: no value, and no crash
    ("\\boxed{3/0}", "3/0", True),                          # ... so compared as text
    ("\\boxed{\\frac{1}{0}}", "\\frac{1}{0}", True),
    ("\\boxed{\\frac{1}{0}}", "1", False),
    ("The answer is " + "7" * 5000, "5", False),              # past Python's int <-> str limit: no crash
    ("\\boxed{" + "7" * 5000 + "}", "7" * 5000, True),         # ... compared as text
    ("\\boxed{1/" + "3" * 5000 + "}", "1/" + "3" * 5000, True),
]


@pytest.mark.parametrize("text, reference, correct", GRADING)
def test_answer_grading(text, reference, correct):
    assert answers_match(text, reference) is correct


def test_extraction_and_normal_forms():
    assert final_answer("\\boxed{\\frac{a}{\\sqrt{b}}} and 3") == "\\frac{a}{\\sqrt{b}}"
    assert final_answer("1, 2 and 3,5") == "5"
    assert final_answer("nothing") is None
    assert normalize("1,250") == normalize("1250.00") == "1250"
    assert normalize("\\frac{2}{4}") == normalize("0.5") == normalize("1/2") == "1/2"


@pytest.mark.parametrize("n, c, k", [(5, 0, 1), (5, 2, 1), (5, 2, 2), (5, 2, 4), (6, 3, 3), (4, 4, 2), (8, 1, 8)])
def test_pass_at_k_is_the_mean_over_all_k_subsets(n, c, k):
    outcomes = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(outcomes, k))
    assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets), abs=1e-12)


def test_summary_has_pass_at_the_sample_count():
    """3 samples a row, so pass@3 besides pass@1 and pass@2; by hand: pass@3 is the share of rows with
    any correct sample (2 of 3), pass@1 the mean share correct ((1/3 + 0 + 2/3) / 3), pass@2 row by row
    1 - C(wrong, 2) / C(3, 2): (1 - 1/3, 0, 1)."""
    ddt = {"num_tokens": 4, "sum_phi": -1.0, "avg_phi": -0.25, "z": 0.5, "avg_logp": -1.0, "avg_entropy": 0.75}
    rows = [{"correct": c, "num_tokens": [4, 4, 4], "end_reasons": ["eos"] * 3, "ddt": [ddt] * 3}
            for c in ([True, False, False], [False] * 3, [True, True, False])]
    summary = summarize_eval(rows, 3)
    assert summary["pass@3"] == pytest.approx(2 / 3)
    assert summary["pass@1"] == pytest.approx(1 / 3) and summary["pass@2"] == pytest.approx(5 / 9)
    assert (summary["rows"], summary["samples"], summary["mean_num_tokens"]) == (3, 3, 4)
    assert "pass@4" not in summary


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def test_tp3_equals_tp1_greedy_on_smollm2(tmp_path):
    rows = read_jsonl(ROOT / "data" / "math_sft.jsonl")[:2]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = [TOOL, "--model", "smollm2-135m", "--data", str(data), "--max-new-tokens", "32"]
    one = subprocess.run([sys.executable] + common + ["--out", str(tmp_path / "tp1.jsonl")], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    # torchrun: the killed-run test below starts the tool with deepspeed's launcher.
    three = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=3"] + common
                           + ["--out", str(tmp_path / "tp3.jsonl"), "--tensor-model-parallel-size", "3"],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert three.returncode == 0, three.stdout[-3000:] + three.stderr[-3000:]
    tp1, tp3 = read_jsonl(tmp_path / "tp1.jsonl"), read_jsonl(tmp_path / "tp3.jsonl")
    assert [r["completions"] for r in tp3] == [r["completions"] for r in tp1]
    for got, row in zip(tp1, rows):
        assert {k: got[k] for k in row} == row
        (text,), (reason,), (n,), (ddt,) = got["completions"], got["end_reasons"], got["num_tokens"], got["ddt"]
        assert got["extracted"] == [final_answer(text)] and got["correct"] == [answers_match(text, row["answer"])]
        assert text.strip() and 0 < n <= 32 and reason in ("eos", "max-length", "repeating")
        assert ddt["num_tokens"] == n  # the completion's own tokens: EOS only where it ended there
    summary = json.loads((tmp_path / "tp1.summary.json").read_text())
    assert summary["pass@1"] == sum(r["correct"][0] for r in tp1) / 2
    assert summary["ddt"]["rows"] == 2 and sum(summary["end_reasons"].values()) == 2
    # Against transformers: its greedy generate on its own chat template's prompt gives the tokens;
    # the text is all of them but an EOS the completion ended on (a cut by length keeps its last token).
    folder = resolve_model_path("smollm2-135m")
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for got, row in zip(tp1, rows):
        text = tok.apply_chat_template([{"role": "user", "content": row["prompt"]}], add_generation_prompt=True,
                                       tokenize=False)
        prompt = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=32,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
        new = out[0, prompt.shape[1]:].tolist()
        ended = new[-1] == tok.eos_token_id
        assert got["completions"] == [tok.decode(new[:-1] if ended else new)]
        assert got["num_tokens"] == [len(new)] and got["end_reasons"][0] == ("eos" if ended else "max-length")
    assert "max-length" in [r["end_reasons"][0] for r in tp1]  # the case whose last token was once dropped


def test_killed_run_resumes_without_redoing_or_losing_rows(tiny_model, tmp_path):  # noqa: F811
    rows = [dict(r, id=i) for i, r in enumerate(read_jsonl(ROOT / "data" / "math_sft.jsonl")[:24])]
    data, out = tmp_path / "data.jsonl", tmp_path / "eval" / "out.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cmd = lambda: [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), TOOL, "--model", str(tiny_model),
                   "--data", str(data), "--out", str(out), "--max-new-tokens", "48", "--batch-size", "1",
                   "--samples", "2", "--temperature", "1"]
    assert kill_a_rank(cmd(), out.parent, TOOL) != 0 and not out.exists()
    # Mark every finished row: a restart that generated one again would overwrite the mark.
    done = {}
    for part in out.parent.glob("*.part-*"):
        lines = part.read_bytes().splitlines(keepends=True)
        good = []
        for line in lines:
            if line.endswith(b"\n"):
                entry = json.loads(line)
                entry["row"]["completions"] = ["kept"] * 2
                done[entry["index"]] = entry["row"]
                good.append(json.dumps(entry) + "\n")
            else:
                good.append(line.decode(errors="replace"))  # a torn last line stays torn
        part.write_text("".join(good))
    assert 2 <= len(done) < len(rows)

    # Rows made two ways would be summarized as one (pass@k of k = 1 over rows of 2 samples).
    other = subprocess.run([*cmd(), "--samples", "1"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert other.returncode == 2 and "rerun with those" in other.stderr and "samples 2 -> 1" in other.stderr, \
        other.stderr[-3000:]
    second = subprocess.run(cmd(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"resuming: {len(done)} rows already done" in second.stdout
    final = read_jsonl(out)
    assert [r["id"] for r in final] == list(range(len(rows)))  # every row once, in input order
    for i, got in enumerate(final):
        assert (got["completions"] == ["kept"] * 2) == (i in done)
        assert len(got["correct"]) == len(got["end_reasons"]) == len(got["ddt"]) == 2
    assert not list(out.parent.glob("*.part-*")) and not list(out.parent.glob("*.settings.json"))
    summary = json.loads(out.with_name("out.summary.json").read_text())
    assert summary["rows"] == len(rows) and "pass@2" in summary


def test_a_signal_to_one_rank_stops_every_rank_after_its_batch_for_requeue(tiny_model, tmp_path):  # noqa: F811
    """SIGTERM to rank 0 alone (as SLURM's preemption or --signal=B:USR1 reaches the tasks): both
    ranks agree at the next batch, finish no more than the batch in progress, exit with the
    status the sbatch scripts requeue on, and the rerun continues from the rows written (the tool
    was killed by the signal, before it took one)."""
    rows = [dict(r, id=i) for i, r in enumerate(read_jsonl(ROOT / "data" / "math_sft.jsonl")[:24])]
    data, out = tmp_path / "data.jsonl", tmp_path / "eval" / "out.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [TOOL, "--model", str(tiny_model), "--data", str(data), "--out", str(out), "--max-new-tokens", "48",
            "--batch-size", "1", "--temperature", "1"]
    port, log = free_port(), tmp_path / "rank0.log"
    ranks = [subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=open(log if r == 0 else os.devnull, "w"),
                              stderr=subprocess.STDOUT,
                              env={**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                   "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for r in range(2)]
    wait_for_rows(out.parent, 2, ranks)
    ranks[0].send_signal(signal.SIGTERM)
    at_signal = complete_lines(out.parent)
    assert [p.wait(timeout=300) for p in ranks] == [REQUEUE_EXIT] * 2, log.read_text()[-3000:]
    assert "evaluate: stopped on signal SIGTERM" in log.read_text()
    parts = list(out.parent.glob("*.part-*"))
    assert all(part.read_bytes().endswith(b"\n") for part in parts)  # stopped between rows, none torn
    done = complete_lines(out.parent)
    assert at_signal <= done <= at_signal + 2 < len(rows)  # at most the batch in progress, per group

    second = subprocess.run([DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"resuming: {done} rows already done" in second.stdout
    assert [r["id"] for r in read_jsonl(out)] == list(range(len(rows)))


def test_a_prompt_the_tokenizer_refuses_is_named(tiny_model, tmp_path):  # noqa: F811
    """A lone surrogate is valid JSON that no tokenizer encodes: the row's error names its file, line
    and field (it was the tokenizer's bare TypeError on the rank holding the row, and the other
    ranks waited in the window's agreement)."""
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "1 + 1?", "answer": "2"}\n{"prompt": "a\\ud800", "answer": "2"}\n')
    run = subprocess.run([sys.executable, TOOL, "--model", str(tiny_model), "--data", str(data),
                          "--out", str(tmp_path / "out.jsonl")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-3000:]
    assert f"evaluate: error: {data}:2: field 'prompt': the tokenizer or chat template failed (TypeError" in run.stderr


def test_a_checkpoint_is_evaluated_from_its_own_export(tiny_model, tmp_path):  # noqa: F811
    """--load: OUT.hf/ is exported from the checkpoint asked for, and reused only for that one (it
    was reused whatever --load and --tag said, so a later checkpoint was evaluated as an earlier)."""
    from safetensors.torch import load_file

    from tests.train_utils import launch

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in read_jsonl(ROOT / "data" / "math_sft.jsonl")[:2]))
    run = tmp_path / "run"
    trained = launch(0, "--model", tiny_model, "--train-data", data, "--seq-length", 128, "--micro-batch-size", 2,
                     "--global-batch-size", 2, "--train-iters", 2, "--save-interval", 1, "--lr", "1e-2", "--save", run,
                     "--deepspeed_config", ROOT / "ds_configs" / "zero0_fp32.json")
    assert trained.returncode == 0, trained.stderr[-3000:]
    out = tmp_path / "eval" / "out.jsonl"
    exported = out.with_name("out.hf")
    weights = []
    for tag in ("iter_0000001", "iter_0000002", "iter_0000002"):
        result = subprocess.run([sys.executable, TOOL, "--load", str(run), "--tag", tag, "--data", str(data),
                                 "--out", str(out), "--max-new-tokens", "2"],
                                cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        assert json.loads((exported / "exported_from.json").read_text()) == {"load": str(run.resolve()), "tag": tag}
        weights.append(((exported / "model.safetensors").stat().st_mtime_ns,
                        load_file(exported / "model.safetensors")["model.norm.weight"]))
    assert not weights[0][1].equal(weights[1][1])  # another checkpoint, exported anew
    assert weights[2][0] == weights[1][0]  # the same checkpoint: the export reused
    # What the export held is freed when it returns, before the tool loads the model to evaluate
    child = ("import sys, weakref\n"
             "from megatron_onpolicy.train import export\n"
             "make, made = export.make_engine, []\n"
             "def spy(*args, **kwargs):\n"
             "    engine = make(*args, **kwargs)\n"
             "    made.append(weakref.ref(engine))\n"
             "    return engine\n"
             "export.make_engine = spy\n"
             "export.export_checkpoint(sys.argv[1], 'iter_0000001', sys.argv[2])\n"
             "print('engine kept' if made[0]() else 'engine freed')\n")
    result = subprocess.run([sys.executable, "-c", child, str(run), str(tmp_path / "hf")], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.stdout.strip().splitlines()[-1:] == ["engine freed"], result.stderr[-3000:]


def test_a_restart_without_tag_continues_with_the_checkpoint_of_its_rows(tiny_model, tmp_path):  # noqa: F811
    """--load without --tag, stopped for requeue while training's `latest` moves on: the rerun
    continues with the checkpoint its rows were made with (it took the new latest, and its own
    settings check refused the rows so far: status 2, never finished)."""
    from tests.train_utils import launch

    rows = read_jsonl(ROOT / "data" / "math_sft.jsonl")[:16]
    data, run, out = tmp_path / "data.jsonl", tmp_path / "run", tmp_path / "eval" / "out.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trained = launch(0, "--model", tiny_model, "--train-data", data, "--seq-length", 128, "--micro-batch-size", 2,
                     "--global-batch-size", 2, "--train-iters", 2, "--save-interval", 1, "--save", run,
                     "--deepspeed_config", ROOT / "ds_configs" / "zero0_fp32.json")
    assert trained.returncode == 0, trained.stderr[-3000:]
    (run / "latest").write_text("iter_0000001")  # as it was before training saved iteration 2
    cmd = [sys.executable, TOOL, "--load", str(run), "--data", str(data), "--out", str(out), "--max-new-tokens", "4",
           "--batch-size", "1"]
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_rows(out.parent, 1, [first])
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=300) == REQUEUE_EXIT, first.stderr.read()[-3000:]
    assert complete_lines(out.parent) < len(rows)
    (run / "latest").write_text("iter_0000002")

    second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "continuing with iter_0000001" in second.stdout
    assert json.loads(out.with_name("out.hf").joinpath("exported_from.json").read_text())["tag"] == "iter_0000001"
    assert len(read_jsonl(out)) == len(rows)


@pytest.mark.parametrize("argv, error", [(["--load", "run", "--model", "m"], "give --model or --load, not both"),
                                         (["--tag", "iter_0000010"], "--tag needs --load")])
def test_a_model_is_given_one_way(argv, error, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--data", "x.jsonl", "--out", "x.jsonl", *argv])
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f": error: {error}")


@pytest.mark.parametrize("split, n, name", [("train", 512, "math_train"), ("test", 64, "math_test"),
                                            ("ood", 64, "math_ood"), ("general", 24, "general_prompts")])
def test_task_splits_are_reproducible_and_correct(split, n, name, tmp_path):
    out = tmp_path / f"{split}.jsonl"
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_math_data.py"), "--split", split, "--n", str(n),
                    "--out", str(out)], check=True, timeout=120)
    assert out.read_bytes() == (ROOT / "data" / f"{name}.jsonl").read_bytes()
    rows = read_jsonl(out)
    assert len({r["prompt"] for r in rows}) == n
    if split == "general":
        return
    if split == "test":  # held out: no training prompt
        assert not {r["prompt"] for r in rows} & {r["prompt"] for r in read_jsonl(ROOT / "data" / "math_train.jsonl")}
    lengths = []
    for r in rows:
        steps = r["response"].splitlines()[:-1]
        lengths.append(len(steps))
        for step in steps:  # every step's arithmetic is right
            a, op, b, value = re.search(r"(\d+) ([-+x/]) (\d+) = (\d+)\.$", step).groups()
            a, b = int(a), int(b)
            assert {"+": a + b, "-": a - b, "x": a * b, "/": a / b}[op] == int(value)
        assert value == r["answer"] and answers_match(r["response"], r["answer"])
    assert min(lengths) == 3 and (sum(lengths) / n > 3.5 if split == "ood" else max(lengths) == 3)  # OOD: more steps
