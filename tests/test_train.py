"""train.py end to end on the tiny config: metrics, checkpoints, export, overrides, accumulation, 2 ranks."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from model import LLaDA

ROOT = Path(__file__).resolve().parent.parent


def small_data(tmp_path: Path, n_train: int = 64, n_eval: int = 8) -> tuple[str, str]:
    lines = (ROOT / "demo" / "sort_train.jsonl").read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(lines[:n_train]) + "\n")
    (tmp_path / "eval.jsonl").write_text("\n".join(lines[-n_eval:]) + "\n")
    return str(tmp_path / "train.jsonl"), str(tmp_path / "eval.jsonl")


def tiny_args(tmp_path: Path, run: str = "run", **overrides: object) -> list[str]:
    """configs/tiny.toml on a 64-record file, small batches, every step logged."""
    train_file, eval_file = small_data(tmp_path)
    values = {
        "model.tokenizer": str(ROOT / "demo" / "tokenizer"), "data.train_files": train_file,
        "data.eval_file": eval_file, "data.cache_dir": str(tmp_path / "cache"), "train.run_dir": str(tmp_path / run),
        "train.micro_batch_size": 4, "train.max_steps": 4, "train.eval_every": 0, "checkpoint.every": 2,
        "log.every": 1, "log.progress": False, "optim.warmup_steps": 1,
    }
    values.update(overrides)
    return [str(ROOT / "configs" / "tiny.toml")] + [f"{k}={v}" for k, v in values.items()]


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    steps = sorted(run_dir.glob("step_*"))
    return load_file(steps[-1] / "model.safetensors")


def test_run_writes_metrics_checkpoints_and_export(tmp_path):
    args = tiny_args(tmp_path, **{"train.eval_every": 2, "checkpoint.keep_last": 1})
    assert train.main(args) == 0
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for key in ("lr", "grad_norm", "tokens_per_s", "response_tokens_per_s", "peak_memory_gib"):
        assert steps[-1][key] > 0
    evals = [r for r in records if "eval_nelbo" in r]
    assert [r["step"] for r in evals] == [2, 4] and all(r["eval_nelbo"] > 0 for r in evals)
    assert sorted(p.name for p in run.glob("step_*")) == ["step_000004"]  # keep_last = 1
    assert {"trainer.json", "model.safetensors", "optimizer.pt", "rng_rank0.pt"} <= {
        p.name for p in (run / "step_000004").iterdir()}
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["max_steps"] == 4
    exported = LLaDA.from_pretrained(run / "final")
    weights = final_weights(run)
    for name, value in exported.state_dict().items():
        assert torch.equal(value, weights[name]), name
    assert (run / "final" / "tokenizer.json").is_file()


def test_failed_relaunch_leaves_the_runs_config(tmp_path, capsys):
    assert train.main(tiny_args(tmp_path, **{"train.max_steps": 1, "checkpoint.every": 0})) == 0
    before = (tmp_path / "run" / "config.json").read_text()
    assert train.main(tiny_args(tmp_path, **{"data.extra_padding": -1})) == 1
    assert "data.extra_padding: -1 must be >= 0" in capsys.readouterr().err
    assert (tmp_path / "run" / "config.json").read_text() == before


def test_overrides_take_effect(tmp_path):
    args = tiny_args(tmp_path, **{"optim.lr": 0.0123, "optim.schedule": "constant", "optim.warmup_steps": 0,
                                  "train.max_steps": 2})
    assert train.main(args) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {r["lr"] for r in records} == {0.0123}
    assert json.loads((tmp_path / "run" / "config.json").read_text())["optim"]["schedule"] == "constant"


def test_unknown_key_fails_with_suggestion(tmp_path, capsys):
    assert train.main(tiny_args(tmp_path, **{"optim.lrr": 1})) == 1
    err = capsys.readouterr().err
    assert "unknown key 'optim.lrr' (did you mean 'optim.lr'?)" in err
    assert train.main(tiny_args(tmp_path, **{"diffusion.normaliser": "token"})) == 1
    assert "did you mean 'diffusion.normalizer'?" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_bad_config_value_fails(tmp_path, capsys):
    assert train.main(tiny_args(tmp_path, **{"diffusion.normalizer": "tokens"})) == 1
    assert "diffusion.normalizer" in capsys.readouterr().err


@pytest.mark.parametrize("normalizer", ["sequence", "token"])
def test_accumulation_matches_one_big_batch(tmp_path, normalizer):
    common = {"data.pad_to": "max_length", "data.extra_padding": 0, "data.length_grouping": False, "train.max_steps": 2,
              "diffusion.normalizer": normalizer, "checkpoint.every": 0, "optim.max_grad_norm": 0.0,
              # Adam's first steps are ~lr * sign(g): for weights whose gradient is ~0, float rounding flips the
              # sign. A larger eps makes the update linear in g there, so equal updates mean equal gradients.
              "optim.eps": 1e-3}
    assert train.main(tiny_args(tmp_path, "big", **common, **{"train.micro_batch_size": 4})) == 0
    assert train.main(tiny_args(tmp_path, "accum", **common, **{"train.micro_batch_size": 1,
                                                                 "train.grad_accum_steps": 4})) == 0
    assert losses(tmp_path / "big") == pytest.approx(losses(tmp_path / "accum"), rel=1e-6)
    big, accum = final_weights(tmp_path / "big"), final_weights(tmp_path / "accum")
    for name in big:
        torch.testing.assert_close(big[name], accum[name], rtol=1e-5, atol=1e-6)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], nproc: int = 2, timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           str(ROOT / "train.py"), *args]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.parametrize("lora", [False, True])
def test_two_ranks_match_one_process(tmp_path, lora):
    # Fixed-length batches: with pad_to=longest each rank pads to its own longest sample, and supervised EOS
    # padding makes the loss depend on that length.
    common = {"train.max_steps": 3, "checkpoint.every": 0, "diffusion.time_sampling": "stratified",
              "data.pad_to": "max_length", "data.extra_padding": 0, "train.grad_accum_steps": 2}
    if lora:  # DDP over a frozen base: only the adapter's gradients are all-reduced
        common.update({"lora.enabled": True, "lora.r": 4, "lora.alpha": 8, "lora.dropout": 0.0, "optim.lr": 1e-2,
                       "optim.eps": 1e-3})
    assert train.main(tiny_args(tmp_path, "single", **common, **{"train.micro_batch_size": 4})) == 0
    torchrun(tiny_args(tmp_path, "ddp", **common, **{"train.micro_batch_size": 2}))
    assert losses(tmp_path / "single") == pytest.approx(losses(tmp_path / "ddp"), rel=1e-5)
    single, ddp = final_weights(tmp_path / "single"), final_weights(tmp_path / "ddp")
    for name in single:
        torch.testing.assert_close(single[name], ddp[name], rtol=1e-4, atol=1e-5)


def test_non_finite_steps_are_skipped_then_the_run_stops(tmp_path, capsys):
    # lr 1e30: the first update blows the weights up, every later loss is non-finite.
    args = tiny_args(tmp_path, **{"optim.lr": 1e30, "optim.warmup_steps": 0, "optim.schedule": "constant",
                                  "train.max_steps": 6, "train.max_bad_steps": 2, "checkpoint.every": 1})
    assert train.main(args) == 3
    out = capsys.readouterr().out
    assert "2 consecutive non-finite steps (train.max_bad_steps); stopping" in out
    assert "step skipped (1 in a row, 1 in all)" in out
    run = tmp_path / "run"
    assert sorted(p.name for p in run.glob("step_*")) == ["step_000001"]  # the last good checkpoint stays
    assert not (run / "final").exists()
