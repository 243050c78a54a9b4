"""tools/ddt_score.py end to end on the embedded SmolLM2-135M: TP=3 equals TP=1, model samples
score like N(0, 1) and human-written solutions clearly negative, bad input fails cleanly."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from megatron_onpolicy.model.hub import resolve_model_path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TOOL = str(ROOT / "tools" / "ddt_score.py")
QUESTIONS = ["Name one color of the sky.", "Say hello in French.", "What is 3 plus 4? Answer with the number only.",
             "Give one word that rhymes with cat.", "What is the capital of Italy?", "Name a fruit that is yellow."]


def launch(n, *args, timeout=600):
    """n ranks under torchrun (tests/test_ddt_score_stream.py starts the tool with deepspeed's
    launcher, whose two processes of its own cost ~5 s of CPU a run), or one plain process (n 0)."""
    cmd = ([str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={n}", TOOL, *args] if n
           else [sys.executable, TOOL, *args])
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def model_samples():
    """Answers sampled from the model itself (temperature 1, full vocabulary) by transformers'
    own generate: an independent source of on-policy text. Four answers a question, all questions
    in one left-padded batch. Only answers that ended with EOS and survive a decode/encode round
    trip are kept, so the scored tokens are exactly the sampled ones."""
    folder = resolve_model_path("smollm2-135m")
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    torch.manual_seed(0)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                       tokenize=True)["input_ids"] for q in QUESTIONS]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[tok.eos_token_id] * (width - len(p)) + p for p in prompts for _ in range(4)])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts for _ in range(4)])
    out = model.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                         max_new_tokens=48, pad_token_id=tok.eos_token_id)
    rows = []
    for k, ids in enumerate(out[:, width:].tolist()):
        if tok.eos_token_id not in ids:
            continue
        ids = ids[:ids.index(tok.eos_token_id)]
        text = tok.decode(ids)
        if ids and tok(text, add_special_tokens=False).input_ids == ids:
            rows.append({"prompt": QUESTIONS[k // 4], "response": text, "source": "model"})
    return rows


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddt")
    human = [dict(r, source="human") for r in read_jsonl(ROOT / "data" / "math_sft.jsonl")[:12]]
    samples = model_samples()
    assert len(samples) >= 8, "too few model samples ended with EOS"
    data = tmp / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in human + samples))
    out = {}
    for n, tp in ((3, 1), (3, 3)):  # TP=1 runs as 3 data-parallel groups, TP=3 as one
        result = launch(n, "--data", str(data), "--out", str(tmp / f"tp{tp}.jsonl"),
                        "--tensor-model-parallel-size", str(tp), "--micro-batch-size", "4", "--dump-tokens")
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        out[tp] = read_jsonl(tmp / f"tp{tp}.jsonl")
        assert not list(tmp.glob(f"tp{tp}.jsonl.part-*")), "shard files left behind"
    return human + samples, out, tmp


def test_tp3_equals_tp1_in_input_order(scored):
    rows, out, tmp = scored
    assert [r["index"] for r in out[1]] == list(range(len(rows)))
    for a, b in zip(out[1], out[3]):
        assert a["response_ids"] == b["response_ids"]
        for key in ("num_tokens", "avg_phi", "sum_phi", "z", "avg_logp", "avg_entropy",
                    "frac_phi_gt_-1", "frac_phi_gt_-3", "frac_phi_gt_-5"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-4), key
        assert max(abs(x - y) for x, y in zip(a["phi"], b["phi"])) < 1e-4
    summary = json.loads((tmp / "tp3.summary.json").read_text())
    assert summary["rows"] == len(rows)
    assert sum(summary["z_histogram"].values()) == len(rows)


def test_model_samples_on_policy_human_text_not(scored):
    rows, out, _ = scored
    by = {"model": [], "human": []}
    for row, res in zip(rows, out[3]):
        by[row["source"]].append(res)
    z_model = sum(r["z"] for r in by["model"]) / len(by["model"])
    phi_human = sum(r["avg_phi"] for r in by["human"]) / len(by["human"])
    z_human = sum(r["z"] for r in by["human"]) / len(by["human"])
    # The mean of n z-scores is ~N(0, 1/n) on-policy: |mean| < 1.5 is > 4 sigma for n >= 8.
    assert abs(z_model) < 1.5, z_model
    assert phi_human < -0.3 and z_human < -2, (phi_human, z_human)
    # the tokens were scored exactly as DESIGN.md section 4 tokenizes them
    for res in by["model"]:
        assert res["response_ids"][-1] == 2 and len(res["phi"]) == res["num_tokens"]
        assert math.isclose(sum(res["phi"]), res["sum_phi"], rel_tol=1e-9, abs_tol=1e-9)


BAD = {
    "malformed": ('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": \n', ":2:"),
    "missing": ('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n', "response"),
    "empty": ('{"prompt": "a", "response": "  "}\n', "empty response"),
}


def test_bad_input_fails_with_one_clear_line(tmp_path):
    procs = {}
    for name, (text, _) in BAD.items():
        (tmp_path / f"{name}.jsonl").write_text(text)
        procs[name] = [sys.executable, TOOL, "--data", str(tmp_path / f"{name}.jsonl"), "--out", str(tmp_path / f"{name}.out.jsonl")]
    procs["no-model"] = [sys.executable, TOOL, "--model", str(tmp_path / "nope"), "--data", str(ROOT / "data" / "math_sft.jsonl"),
                         "--out", str(tmp_path / "x.jsonl")]
    procs["tp-heads"] = [sys.executable, TOOL, "--tensor-model-parallel-size", "2", "--data", str(ROOT / "data" / "math_sft.jsonl"),
                         "--out", str(tmp_path / "y.jsonl")]
    expect = {name: need for name, (_, need) in BAD.items()}
    expect["no-model"] = "does not exist"
    expect["tp-heads"] = "does not divide the model's 9 attention heads"
    running = {name: subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name, cmd in procs.items()}
    for name, p in running.items():
        _, err = p.communicate(timeout=300)
        errors = [line for line in err.splitlines() if line.startswith("ddt_score: error:")]
        assert p.returncode != 0, name
        assert len(errors) == 1 and expect[name] in errors[0], (name, err[-2000:])
        if name in BAD:
            assert f"{name}.jsonl" in errors[0]
    assert not list(tmp_path.glob("*.out.jsonl*")), "nothing is written for bad input"


def test_dumped_response_ids_are_the_scored_tokens_of_a_conversation(tmp_path):
    """--dump-tokens: one response id per phi, also where the scored tokens are a conversation's
    assistant turns (not everything after the first one: template glue and the user's turns)."""
    from megatron_onpolicy.data import tokenize_row
    from megatron_onpolicy.ddt.score import score_batch
    from megatron_onpolicy.model.loader import load_model, load_tokenizer
    from tests.train_utils import make_tiny_model

    folder = make_tiny_model(tmp_path / "tiny", layers=1)
    model, _ = load_model(str(folder))
    tok = load_tokenizer(folder)
    turns = ["Hello! How can I help?", "4 x 4 = 16."]
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": turns[0]},
                {"role": "user", "content": "What is 4 x 4?"}, {"role": "assistant", "content": turns[1]}]
    sample = tokenize_row(tok, {"messages": messages}, "m:1", 0)
    row, = score_batch(model, [sample], 0, dump_tokens=True)
    assert len(row["response_ids"]) == len(row["phi"]) == row["num_tokens"]
    assert tok.decode(row["response_ids"]) == "".join(t + tok.eos_token for t in turns)


def test_scores_and_dumped_ids_match_transformers(scored):
    """A human and a model row of the TP=1 and TP=3 runs against transformers' own forward, with
    log_softmax by hand: avg_logp = mean log p(y), avg_entropy = mean H, avg_phi = mean(log p(y) + H),
    z = sum phi / sqrt(sum Var_p[log p]) and the fraction of phi above each threshold (DESIGN.md).
    The dumped prompt_ids are the chat template of the user turn with the generation prompt,
    straight from the tokenizer, and response_ids the response's tokens and EOS."""
    rows, out, _ = scored
    folder = resolve_model_path("smollm2-135m")
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    prompt_of = lambda row: list(tok.apply_chat_template([{"role": "user", "content": row["prompt"]}],
                                                         add_generation_prompt=True, tokenize=True)["input_ids"])
    for tp in (1, 3):
        for row, res in zip(rows, out[tp]):
            assert res["prompt_ids"] == prompt_of(row)
            assert res["response_ids"] == tok(row["response"], add_special_tokens=False).input_ids + [tok.eos_token_id]
    human = next(i for i, r in enumerate(rows) if r["source"] == "human")
    sample = next(i for i, r in enumerate(rows) if r["source"] == "model")
    for i in (human, sample):
        prompt = prompt_of(rows[i])
        ids = torch.tensor([prompt + tok(rows[i]["response"], add_special_tokens=False).input_ids + [tok.eos_token_id]])
        with torch.no_grad():
            logp = model(ids).logits[0, len(prompt) - 1:-1].double().log_softmax(-1)
        logp_y = logp.gather(-1, ids[0, len(prompt):, None])[:, 0]
        entropy = -(logp.exp() * logp).sum(-1)
        phi = logp_y + entropy
        var = (logp.exp() * logp.square()).sum(-1) - entropy.square()  # Var_p[log p], DESIGN.md
        for tp in (1, 3):
            res = out[tp][i]
            assert res["num_tokens"] == len(logp_y)
            assert res["avg_logp"] == pytest.approx(float(logp_y.mean()), abs=1e-4), (tp, i)
            assert res["avg_entropy"] == pytest.approx(float(entropy.mean()), abs=1e-4), (tp, i)
            assert res["avg_phi"] == pytest.approx(float(phi.mean()), abs=1e-4), (tp, i)
            assert res["z"] == pytest.approx(float(phi.sum() / var.sum().sqrt()), rel=1e-4, abs=1e-4), (tp, i)
            for key in [k for k in res if k.startswith("frac_phi_gt_")]:
                t = float(key.removeprefix("frac_phi_gt_"))
                # a phi within the tolerance of the threshold may fall on either side
                low, high = (float((phi > t + d).double().mean()) for d in (1e-3, -1e-3))
                assert low - 1e-9 <= res[key] <= high + 1e-9, (tp, i, key, res[key], low, high)
        assert {k for k in out[1][i] if k.startswith("frac_phi_gt_")} == {"frac_phi_gt_-1", "frac_phi_gt_-3",
                                                                          "frac_phi_gt_-5"}
