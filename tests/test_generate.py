"""generate.py end to end on a tiny random LLaDA saved with save_pretrained plus the demo tokenizer."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import generate as gen  # noqa: E402
from data import load_tokenizer, special_token_ids  # noqa: E402
from model import LLaDA, LLaDAConfig  # noqa: E402

FAST = ["--steps", "4", "--gen-length", "16", "--block-length", "8"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_model")
    tok = load_tokenizer(str(ROOT / "demo" / "tokenizer"))
    ids = special_token_ids(tok)
    config = LLaDAConfig.from_name("tiny", n_layers=2, vocab_size=len(tok), mask_token_id=ids["mask"],
                                   eos_token_id=ids["eos"], pad_token_id=ids["pad"])
    LLaDA.from_config(config, seed=1).save_pretrained(out)
    for f in (ROOT / "demo" / "tokenizer").iterdir():
        shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "eval.jsonl"
    lines = (ROOT / "demo" / "sort_eval.jsonl").read_text().splitlines()[:5]
    path.write_text("\n".join(lines) + "\n")
    return path


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_input_file_to_jsonl_with_references(model_dir, eval_file, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    assert gen.main([str(model_dir), "--input", str(eval_file), "--output", str(out), "--batch-size", "2", *FAST]) == 0
    rows = read_jsonl(out)
    records = read_jsonl(eval_file)
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in records]  # input order kept
    assert [r["reference"] for r in rows] == [r["response"] for r in records]
    assert all(isinstance(r["output"], str) and isinstance(r["correct"], bool) for r in rows)
    assert "exact match:" in capsys.readouterr().out


def test_batched_left_padding_matches_one_by_one(model_dir, eval_file, tmp_path):
    outputs = []
    for batch_size in ("1", "5"):
        out = tmp_path / f"out{batch_size}.jsonl"
        assert gen.main([str(model_dir), "--input", str(eval_file), "--output", str(out),
                         "--batch-size", batch_size, *FAST]) == 0
        outputs.append([r["output"] for r in read_jsonl(out)])
    lengths = {len(r["prompt"]) for r in read_jsonl(eval_file)}
    assert len(lengths) > 1  # the batch really needs padding
    assert outputs[0] == outputs[1]


def test_accuracy_counts_exact_matches(model_dir, eval_file, tmp_path, capsys, monkeypatch):
    # A stand-in sampler that writes the reference answer for the first 3 prompts: 3/5 correct.
    tok = load_tokenizer(str(model_dir))
    ids = special_token_ids(tok)
    answers = {len(gen.encode_prompt(tok, [{"role": "user", "content": r["prompt"]}])): r["response"]
               for r in read_jsonl(eval_file)[:3]}

    def scripted(model, prompt, *, gen_length, attention_mask=None, **kwargs):
        rows = []
        for b in range(prompt.shape[0]):
            real = int(attention_mask[b].sum()) if attention_mask is not None else prompt.shape[1]
            answer = tok.encode(answers.get(real, "wrong"), add_special_tokens=False) + [ids["eot"]]
            rows.append(prompt[b].tolist() + (answer + [ids["eos"]] * gen_length)[:gen_length])
        return torch.tensor(rows)

    monkeypatch.setattr(gen, "generate", scripted)
    assert len(answers) == 3
    out = tmp_path / "out.jsonl"
    assert gen.main([str(model_dir), "--input", str(eval_file), "--output", str(out), "--gen-length", "32",
                     "--block-length", "32", "--steps", "4"]) == 0
    assert [r["correct"] for r in read_jsonl(out)].count(True) == 3
    assert "exact match: 3/5 = 60.0%" in capsys.readouterr().out


def test_prompt_and_prompt_only_file(model_dir, tmp_path, capsys):
    assert gen.main([str(model_dir), "--prompt", "sort: 3 1 2", "--temperature", "1", "--eos-last",
                     "--suppress-eos", "--cfg-scale", "1", *FAST]) == 0
    assert "### sort: 3 1 2" in capsys.readouterr().out
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "sort: 2 1"}) + "\n" + json.dumps(
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "reverse: 1 2"}]}) + "\n")
    out = tmp_path / "out.jsonl"
    assert gen.main([str(model_dir), "--input", str(path), "--output", str(out), *FAST]) == 0
    rows = read_jsonl(out)
    assert [r["prompt"] for r in rows] == ["sort: 2 1", "reverse: 1 2"] and all("correct" not in r for r in rows)
    assert "exact match" not in capsys.readouterr().out


def test_adapter(model_dir, eval_file, tmp_path):
    lora = pytest.importorskip("lora")
    model = LLaDA.from_pretrained(model_dir)
    cfg = lora.LoRAConfig(enabled=True, r=4, alpha=8.0, targets=["q_proj", "v_proj"])
    lora.inject_lora(model, cfg)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # a non-zero adapter, so it changes the outputs
    lora.save_adapter(model, tmp_path / "adapter", cfg, str(model_dir))
    outputs = []
    for extra in ([], ["--adapter", str(tmp_path / "adapter")]):
        out = tmp_path / f"out{len(extra)}.jsonl"
        assert gen.main([str(model_dir), "--input", str(eval_file), "--output", str(out), *extra, *FAST]) == 0
        outputs.append([r["output"] for r in read_jsonl(out)])
    assert outputs[0] != outputs[1]


@pytest.mark.parametrize("args,message", [
    (["--prompt", "x", "--gen-length", "10", "--block-length", "4"], "multiple of --block-length"),
    (["--input", "missing.jsonl"], "missing.jsonl"),
    (["--prompt", "x", "--steps", "0"], "--steps must be >= 1"),
])
def test_bad_arguments_exit_1_with_one_line(model_dir, args, message, capsys):
    assert gen.main([str(model_dir), *args]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_bad_files_exit_1(tmp_path, model_dir, capsys):
    assert gen.main([str(tmp_path), "--prompt", "x"]) == 1
    assert "no config.json" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": 3}\n')
    assert gen.main([str(model_dir), "--input", str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert "bad.jsonl:2" in err and "\n" not in err


def test_command_line(model_dir):
    done = subprocess.run([sys.executable, str(ROOT / "generate.py"), str(model_dir), "--prompt", "sort: 2 1", *FAST],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "### sort: 2 1" in done.stdout


def test_usage_error_is_one_line(model_dir, capsys):
    assert gen.main([str(model_dir)]) == 1  # neither --prompt nor --input
    err = capsys.readouterr().err
    assert "--prompt" in err and err.count("\n") == 1
