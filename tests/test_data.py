"""data.py: schemas, the prompt boundary, padding, multi-turn policies, length handling, rank sharding,
resume, the cache and every bad-input message. Uses the committed demo tokenizer; runs in seconds."""
import json
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import data  # noqa: E402
from data import BatchIterator, DataConfig, DataError  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")
TOKENIZER = os.path.join(ROOT, "demo", "tokenizer")


@pytest.fixture(scope="module")
def tok():
    return data.load_tokenizer(TOKENIZER)


@pytest.fixture(scope="module")
def ids(tok):
    return data.special_token_ids(tok)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def sort_records(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        d = rng.integers(0, 10, rng.integers(5, 11)).tolist()
        out.append({"prompt": "sort: " + " ".join(map(str, d)), "response": " ".join(map(str, sorted(d)))})
    return out


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False)


# ----------------------------------------------------------------------------- schemas

U, A = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}
SCHEMAS = [
    ({"messages": [U, A]}, "messages", [U, A]),
    ({"messages": [{"role": "system", "content": "be brief"}, U, A]}, "messages",
     [{"role": "system", "content": "be brief"}, U, A]),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}, "sharegpt", [U, A]),
    ({"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
     "sharegpt", [{"role": "system", "content": "s"}, U, A]),
    ({"prompt": "hi", "response": "yo"}, "prompt_response", [U, A]),
    ({"prompt": "hi", "completion": "yo"}, "prompt_response", [U, A]),
    ({"input": "hi", "output": "yo"}, "input_output", [U, A]),
    ({"instruction": "hi", "output": "yo"}, "alpaca", [U, A]),
    ({"instruction": "hi", "input": "x", "output": "yo"}, "alpaca", [{"role": "user", "content": "hi\n\nx"}, A]),
    ({"instruction": "hi", "input": "", "output": "yo"}, "alpaca", [U, A]),
    ({"question": "hi", "thinking_trajectories": ["hmm"], "attempt": "yo"}, "s1k",
     [U, {"role": "assistant", "content": "<reasoning>hmm</reasoning>\n<answer>yo</answer>"}]),
    ({"system": "s", "prompt": "hi", "response": "yo"}, "prompt_response", [{"role": "system", "content": "s"}, U, A]),
]


@pytest.mark.parametrize("record,schema,messages", SCHEMAS)
def test_each_schema(tmp_path, record, schema, messages):
    path = write_jsonl(tmp_path / "d.jsonl", [record])
    (conv,) = data.read_records(path)
    assert conv.schema == schema and conv.messages == messages and conv.source == f"{path}:1"


def test_json_array_keeps_line_numbers(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"prompt": "a", "response": "b"},\n\n  {"input": "c", "output": "d"}\n]\n')
    convs = data.read_records(str(path))
    assert [c.source for c in convs] == [f"{path}:2", f"{path}:4"]
    assert [c.schema for c in convs] == ["prompt_response", "input_output"]


# ----------------------------------------------------------------------------- tokenisation

def test_prompt_boundary_includes_assistant_header(tmp_path, tok, ids):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "sort: 3 1 2", "response": "1 2 3"}])
    arr = data.tokenise_file(path, tok, max_length=4096, truncate=False)
    seq, P = arr["tokens"].tolist(), int(arr["prompt_lens"][0])
    header = [ids["eot"]] + enc(tok, "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert seq[0] == ids["bos"]
    assert seq[P - len(header): P] == header  # the assistant header is the end of the protected prompt
    assert seq[P:] == enc(tok, "1 2 3") + [ids["eot"]]  # response = answer + end of turn
    assert data.encode_prompt(tok, [{"role": "user", "content": "sort: 3 1 2"}]) == seq[:P]


def test_eos_padding_longest_and_max_length(tmp_path, tok, ids):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "a", "response": "bbbbbbbbbb"}])
    cfg = DataConfig(train_files=[path], eval_fraction=0.0, cache_dir="", max_length=100, multi_turn="last")
    ds, _ = data.build_datasets(cfg, tok, log=lambda s: None)
    lens = ds.lengths(0)
    b = data.collate(ds, np.array([0, 1]), 0, pad_to="longest", pad_multiple=8, max_length=100, pad_id=ids["pad"])
    assert b.input_ids.shape == (2, -(-int(lens.max()) // 8) * 8)
    for row in range(2):
        n, P = int(lens[row]), int(b.prompt_lengths[row])
        assert b.input_ids[row, n - 1] == ids["eot"]
        assert (b.input_ids[row, n:] == ids["eos"]).all()  # EOS padding after the end of turn
        assert b.answer_lengths[row] == n - P
    assert b.indices.tolist() == [0, 1]
    b = data.collate(ds, np.array([0]), 0, pad_to="max_length", pad_multiple=8, max_length=100, pad_id=ids["pad"])
    assert b.input_ids.shape == (1, 100) and (b.input_ids[0, int(lens[0]):] == ids["eos"]).all()
    b = data.collate(ds, np.array([1]), 0, pad_to="longest", pad_multiple=64, max_length=30, pad_id=ids["pad"])
    assert b.input_ids.shape[1] == 30  # rounding up never passes max_length


# ----------------------------------------------------------------------------- multi-turn

def multi_turn_file(tmp_path):
    conv = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"},
                         {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
                         {"role": "assistant", "content": "a2"}]}
    return write_jsonl(tmp_path / "mt.jsonl", [conv, {"prompt": "q", "response": "a"}])


def answers(ds, tok, epoch=0):
    out = []
    for i in range(len(ds)):
        seq, P = ds.sample(i, epoch)
        out.append(tok.decode(seq[P:].tolist()))
    return out


@pytest.mark.parametrize("policy,expected", [
    ("last", ["a2<|eot_id|>", "a<|eot_id|>"]),
    ("all", ["a1<|eot_id|>", "a2<|eot_id|>", "a<|eot_id|>"]),
])
def test_multi_turn_last_and_all(tmp_path, tok, policy, expected):
    cfg = DataConfig(train_files=[multi_turn_file(tmp_path)], eval_fraction=0.0, cache_dir="", multi_turn=policy)
    ds, _ = data.build_datasets(cfg, tok, log=lambda s: None)
    assert answers(ds, tok) == expected
    seq, P = ds.sample(len(ds) - 2 if policy == "all" else 0)
    prompt = tok.decode(seq[:P].tolist())
    assert "q1" in prompt and "a1" in prompt and prompt.endswith("assistant<|end_header_id|>\n\n")  # history kept


def test_multi_turn_random_draws_one_turn_per_epoch(tmp_path, tok):
    cfg = DataConfig(train_files=[multi_turn_file(tmp_path)], eval_fraction=0.0, cache_dir="", multi_turn="random")
    ds, _ = data.build_datasets(cfg, tok, log=lambda s: None)
    assert len(ds) == 2  # one sample per conversation
    draws = [answers(ds, tok, epoch)[0] for epoch in range(40)]
    assert set(draws) == {"a1<|eot_id|>", "a2<|eot_id|>"}  # both turns get drawn over epochs
    ds2, _ = data.build_datasets(cfg, tok, log=lambda s: None)
    assert draws == [answers(ds2, tok, epoch)[0] for epoch in range(40)]  # deterministic in (seed, epoch, index)


# ----------------------------------------------------------------------------- length handling

def test_drop_count_and_truncation_report(tmp_path, tok, ids):
    recs = [{"prompt": "a", "response": "b"}, {"prompt": "a", "response": "b" * 50},
            {"prompt": "a", "response": "c"}, {"prompt": "a", "response": "b" * 60}]
    path = write_jsonl(tmp_path / "d.jsonl", recs)
    logs = []
    cfg = DataConfig(train_files=[path], eval_fraction=0.0, cache_dir="", max_length=40)
    ds, _ = data.build_datasets(cfg, tok, log=logs.append)
    assert len(ds) == 2
    assert "dropped 2 over max_length=40 (lines 2, 4)" in logs[0]
    assert any("p50/p90/p99/max" in s for s in logs) and any("padding" in s for s in logs)
    logs.clear()
    cfg.truncate = True
    ds, _ = data.build_datasets(cfg, tok, log=logs.append)
    assert len(ds) == 4 and "truncated 2 responses" in logs[0] and "dropped" not in logs[0]
    seq, _ = ds.sample(1)
    assert len(seq) == 40 and seq[-1] != ids["eot"]  # a truncated sample has no end of turn


# ----------------------------------------------------------------------------- ranks, weights, resume

def test_identical_splits_and_disjoint_rank_shares(tmp_path, tok, ids):
    path = write_jsonl(tmp_path / "d.jsonl", sort_records(200))
    cfg = DataConfig(train_files=[path], eval_fraction=0.1, cache_dir="", pad_multiple=8)
    sets = [data.build_datasets(cfg, tok, rank=r, world_size=2, log=lambda s: None) for r in (0, 1)]
    for a, b in zip(sets[0], sets[1]):  # train and eval identical on both ranks
        assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.offsets, b.offsets)
    train, evals = sets[0]
    assert len(evals) == 20 and len(train) == 180
    eval_seqs = {evals.sample(i)[0].tobytes() for i in range(len(evals))}
    assert not eval_seqs & {train.sample(i)[0].tobytes() for i in range(len(train))}
    for grouping in (False, True):
        kw = dict(seed=3, pad_id=ids["pad"], pad_multiple=8, length_grouping=grouping)
        whole = BatchIterator(train, 8, world_size=1, **kw)
        shards = [BatchIterator(train, 4, rank=r, world_size=2, **kw) for r in (0, 1)]
        assert whole.steps_per_epoch == shards[0].steps_per_epoch == 180 // 8
        for _ in range(2 * whole.steps_per_epoch + 3):  # across epoch boundaries
            g, s0, s1 = next(whole), next(shards[0]), next(shards[1])
            assert not set(s0.indices.tolist()) & set(s1.indices.tolist())
            assert s0.indices.tolist() + s1.indices.tolist() == g.indices.tolist()
        assert shards[0].epoch == 2


def test_length_grouping_reduces_padding(tmp_path, tok, ids):
    path = write_jsonl(tmp_path / "d.jsonl", sort_records(400))
    ds, _ = data.build_datasets(DataConfig(train_files=[path], eval_fraction=0.0, cache_dir=""), tok, log=lambda s: None)
    frac = [BatchIterator(ds, 8, pad_id=ids["pad"], pad_multiple=1, length_grouping=g).padding_fraction() for g in (0, 1)]
    assert frac[1] < frac[0] / 2


def test_extra_padding_varies_the_canvas_alike_on_all_ranks(tmp_path, tok, ids):
    path = write_jsonl(tmp_path / "d.jsonl", sort_records(200))
    ds, _ = data.build_datasets(DataConfig(train_files=[path], eval_fraction=0.0, cache_dir=""), tok, log=lambda s: None)
    kw = dict(seed=1, pad_id=ids["pad"], pad_multiple=4, max_length=64, world_size=2)
    plain = [BatchIterator(ds, 4, rank=r, **kw) for r in (0, 1)]
    extra = [BatchIterator(ds, 4, rank=r, extra_padding=9, **kw) for r in (0, 1)]
    draws = extra[0].extras(0)  # one draw per step, shared by the ranks
    assert np.array_equal(draws, extra[1].extras(0)) and draws.min() >= 0 and draws.max() <= 9
    assert len(set(draws.tolist())) >= 5
    real = total = 0
    for step in range(plain[0].steps_per_epoch):
        for p, e in zip(map(next, plain), map(next, extra)):
            L = p.input_ids.shape[1]
            assert e.input_ids.shape[1] == min(L + draws[step], 64)  # never past max_length
            assert torch.equal(p.indices, e.indices) and torch.equal(e.input_ids[:, :L], p.input_ids)
            assert (e.input_ids[:, L:] == ids["pad"]).all()  # the extra positions are EOS
            real += int((e.prompt_lengths + e.answer_lengths).sum())
            total += e.input_ids.numel()
    assert extra[0].padding_fraction(0) > plain[0].padding_fraction(0)
    assert 1 - real / total == pytest.approx(extra[0].padding_fraction(0), abs=1e-12)  # the report matches
    with pytest.raises(DataError, match="data.extra_padding"):
        data.build_datasets(DataConfig(train_files=[path], pad_to="max_length", extra_padding=4, cache_dir=""), tok)


def test_resume_continues_exactly(tmp_path, tok, ids):
    path = write_jsonl(tmp_path / "d.jsonl", sort_records(50))
    ds, _ = data.build_datasets(DataConfig(train_files=[path], eval_fraction=0.0, cache_dir=""), tok, log=lambda s: None)
    kw = dict(rank=1, world_size=2, seed=5, pad_id=ids["pad"], pad_multiple=8, length_grouping=True)
    it = BatchIterator(ds, 3, **kw)
    for _ in range(10):
        next(it)
    state = it.state_dict()
    assert state == {"epoch": 1, "offset": 2}  # 8 steps per epoch
    expected = [next(it) for _ in range(12)]
    resumed = BatchIterator(ds, 3, **kw)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip
    for a, b in zip(expected, (next(resumed) for _ in range(12))):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.indices, b.indices)


def test_file_weights_repeat_and_subsample(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", sort_records(10, seed=1))
    b = write_jsonl(tmp_path / "b.jsonl", sort_records(20, seed=2))
    cfg = DataConfig(train_files=[a, b], train_weights=[2.0, 0.5], eval_fraction=0.0, cache_dir="")
    ds, _ = data.build_datasets(cfg, tok, log=lambda s: None)
    e0, e1 = ds.epoch_samples(0), ds.epoch_samples(1)
    assert len(e0) == len(e1) == 2 * 10 + 10
    assert np.bincount(ds.file_ids[e0]).tolist() == [20, 10]
    assert not np.array_equal(e0[20:], e1[20:])  # a different half of file b each epoch


def test_eval_batches_each_sample_once(tmp_path, tok, ids):
    path = write_jsonl(tmp_path / "d.jsonl", sort_records(7))
    ds, _ = data.build_datasets(DataConfig(train_files=[path], eval_fraction=0.0, cache_dir=""), tok, log=lambda s: None)
    kw = dict(pad_id=ids["pad"], pad_multiple=8, world_size=3)
    per_rank = [list(data.eval_batches(ds, 2, rank=r, **kw)) for r in range(3)]
    assert [len(b) for b in per_rank] == [data.eval_steps(7, 2, 3)] * 3  # lock-step across ranks
    seen = [i for batches in per_rank for b in batches for i in b.indices.tolist() if i >= 0]
    assert sorted(seen) == list(range(7))
    fillers = [(b.indices == -1) for batches in per_rank for b in batches]
    assert sum(int(f.sum()) for f in fillers) == 2  # 7 = 6 + 1: ranks 1 and 2 get a filler row in step 2
    assert all((b.answer_lengths[b.indices == -1] == 0).all() for batches in per_rank for b in batches)


# ----------------------------------------------------------------------------- cache

def test_cache_hit_and_other_ranks_read_it(tmp_path, tok, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    path = write_jsonl(tmp_path / "d.jsonl", sort_records(30))
    cfg = DataConfig(train_files=[path], eval_fraction=0.1, cache_dir=str(tmp_path / "cache"))
    logs = []
    first, _ = data.build_datasets(cfg, tok, log=logs.append)
    assert "cache hit" not in logs[0]
    assert len([f for f in os.listdir(cfg.cache_dir) if f.endswith(".npz")]) == 1
    monkeypatch.setattr(data, "tokenise_file", lambda *a, **k: pytest.fail("cache not used"))
    for rank in (0, 1):
        logs.clear()
        again, _ = data.build_datasets(cfg, tok, rank=rank, world_size=2, log=logs.append)
        assert "[cache hit]" in logs[0]
        assert np.array_equal(first.tokens, again.tokens) and np.array_equal(first.offsets, again.offsets)
    cfg.max_length = 30  # a different setting is a different key: rank 1 must not read the old arrays
    monkeypatch.setattr(data, "CACHE_WAIT_S", 0.3)
    with pytest.raises(DataError, match="waited"):
        data.build_datasets(cfg, tok, rank=1, world_size=2, log=lambda s: None)


def test_cache_error_reaches_waiting_ranks(tmp_path, tok, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
    cfg = DataConfig(train_files=[str(path)], eval_fraction=0.0, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError) as e0:
        data.build_datasets(cfg, tok, rank=0, log=lambda s: None)
    with pytest.raises(DataError) as e1:
        data.build_datasets(cfg, tok, rank=1, world_size=2, log=lambda s: None)
    assert str(e0.value) == str(e1.value)  # rank 1 reads rank 0's error instead of waiting forever
    assert str(e0.value).startswith(f"{path}:2: no known schema, keys found: ['prompt']")


# ----------------------------------------------------------------------------- bad input

GOOD = '{"prompt": "a", "response": "b"}\n'
BAD = [
    (GOOD + '{"prompt": "a", "response": }\n', 2, "invalid JSON"),
    (GOOD + GOOD + '{"text": "a", "label": 1}\n', 3, "no known schema, keys found: ['label', 'text']"),
    (GOOD + '{"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}\n', 2,
     "role 'tool'"),
    (GOOD + '{"conversations": [{"from": "bot", "value": "x"}, {"from": "gpt", "value": "y"}]}\n', 2, "role 'bot'"),
    (GOOD + '{"prompt": "a", "response": "  "}\n', 2, "empty assistant answer"),
    (GOOD + '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}\n', 2,
     "empty assistant answer"),
    (GOOD + '{"prompt": "a", "response": 3}\n', 2, "'response' is int, expected a string"),
    (GOOD + '{"messages": [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "b"}]}\n', 2,
     "content is list, expected a string"),
    (GOOD + '{"messages": [{"role": "user", "content": "a"}]}\n', 2, "the last turn is 'user'"),
    (GOOD + '{"messages": [{"user": "a"}]}\n', 2, "turn 0 needs 'role' and 'content'"),
    (GOOD + '["prompt", "response"]\n', 2, "expected a JSON object, got list"),
    (GOOD + '{"question": "q", "thinking_trajectories": [], "attempt": "a"}\n', 2, "thinking_trajectories"),
    ("", 1, "file is empty"),
    ("\n  \n", 1, "file is empty"),
    ('[\n' + GOOD.strip() + ',\n  {"prompt": "a" "response": "b"}\n]\n', 3, "invalid JSON"),
]


@pytest.mark.parametrize("text,line,what", BAD)
def test_bad_input_names_path_and_line(tmp_path, text, line, what):
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(DataError) as e:
        data.read_records(str(path))
    msg = str(e.value)
    assert msg.startswith(f"{path}:{line}: ") and what in msg and "\n" not in msg


def test_non_utf8_and_missing_file(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(GOOD.encode() + b'{"prompt": "caf\xe9", "response": "b"}\n')
    with pytest.raises(DataError, match=rf"^{path}:2: not valid UTF-8 \(byte 0xe9\)$"):
        data.read_records(str(path))
    with pytest.raises(DataError, match=rf"^{tmp_path}/nope.jsonl:0: file not found$"):
        data.read_records(str(tmp_path / "nope.jsonl"))


def test_template_breaking_the_prefix_is_an_error(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}])
    # A template whose generation prompt differs from how the answer turn is rendered.
    bad = type(tok).from_pretrained(TOKENIZER)
    bad.chat_template = data.LLAMA3_TEMPLATE.replace("{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif",
                                                     "{{ 'answer: ' }}{% endif")
    with pytest.raises(DataError, match=rf"^{path}:1: the chat template's prompt tokens are not a prefix"):
        data.tokenise_file(path, bad, max_length=100, truncate=False)


def test_check_cli_exits_1_with_one_line(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text(GOOD + "{oops\n")
    assert data.main(["check", "--tokenizer", TOKENIZER, str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}:2: invalid JSON") and err.count("\n") == 1


# ----------------------------------------------------------------------------- demo assets

def test_demo_assets(tmp_path, tok, ids):
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(TOKENIZER, trust_remote_code=False)
    assert auto.convert_tokens_to_ids("<|mdm_mask|>") == ids["mask"] and ids["pad"] == ids["eos"]
    assert len(enc(tok, "user assistant system")) == 5  # role words are single tokens
    train = data.read_records(os.path.join(ROOT, "demo", "sort_train.jsonl"))
    evals = data.read_records(os.path.join(ROOT, "demo", "sort_eval.jsonl"))
    assert len(evals) == 200 and len(train) >= 10000
    assert not {c.messages[0]["content"] for c in evals} & {c.messages[0]["content"] for c in train}
    c = train[0].messages
    task, digits = c[0]["content"].split(": ")
    d = list(digits)
    assert list(c[1]["content"]) == (sorted(d) if task == "sort" else d[::-1]) and 5 <= len(d) <= 10
    data.make_demo(str(tmp_path), n_train=50, n_eval=5)  # the generator is deterministic
    data.make_demo(str(tmp_path / "again"), n_train=50, n_eval=5)
    for name in ("sort_train.jsonl", "sort_eval.jsonl", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
