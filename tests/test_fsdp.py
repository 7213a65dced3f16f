"""FSDP2 on CPU with gloo: same losses as one process, exact resume from sharded checkpoints, per-rank loading of
an HF checkpoint, and an export that matches the sharded model."""

import json
import os
import subprocess
import sys

import pytest
import torch

import parallel
import train
from model import LLaDA, LLaDAConfig
from tests.test_train import ROOT, free_port, losses, tiny_args, torchrun


def export_weights(run_dir):
    return LLaDA.from_pretrained(run_dir / "final").state_dict()


def test_fsdp_matches_one_process_resumes_and_exports(tmp_path):
    # pad_to=max_length: with pad_to=longest each rank pads to its own longest sample, and supervised EOS padding
    # makes the loss depend on that length, so only fixed-length batches give layout-independent losses.
    common = {"train.max_steps": 4, "checkpoint.every": 2, "optim.schedule": "constant", "optim.warmup_steps": 0,
              "diffusion.time_sampling": "stratified", "train.grad_accum_steps": 2, "data.pad_to": "max_length", "data.extra_padding": 0}
    assert train.main(tiny_args(tmp_path, "single", **common, **{"train.micro_batch_size": 4})) == 0
    fsdp = {**common, "train.micro_batch_size": 2, "parallel.mode": "fsdp"}
    out = torchrun(tiny_args(tmp_path, "fsdp", **fsdp)).stdout
    assert "mode fsdp" in out and "memory per rank (fsdp, 2 ranks)" in out
    assert losses(tmp_path / "single") == pytest.approx(losses(tmp_path / "fsdp"), rel=1e-5)
    single, sharded = export_weights(tmp_path / "single"), export_weights(tmp_path / "fsdp")
    for name in single:
        torch.testing.assert_close(single[name], sharded[name], rtol=1e-4, atol=1e-5)
    assert (tmp_path / "fsdp" / "step_000004" / "dcp").is_dir()

    # Interrupted at step 2, resumed from the sharded checkpoint: the same run as the uninterrupted one.
    torchrun(tiny_args(tmp_path, "resumed", **{**fsdp, "train.stop_at_step": 2}))
    torchrun(tiny_args(tmp_path, "resumed", **fsdp))
    assert losses(tmp_path / "resumed") == losses(tmp_path / "fsdp")
    resumed = export_weights(tmp_path / "resumed")
    for name in sharded:
        assert torch.equal(sharded[name], resumed[name]), name

    # Load the export straight into shards on 2 ranks: same logits as a plain load, same weights when gathered.
    out_file = tmp_path / "worker.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(ROOT / "tests" / "fsdp_worker.py"), str(tmp_path / "fsdp" / "final"), str(out_file)]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    worker = torch.load(out_file, weights_only=False)
    plain = LLaDA.from_pretrained(tmp_path / "fsdp" / "final")
    with torch.no_grad():
        expected = plain(torch.arange(24).reshape(2, 12) % plain.config.vocab_size)
    torch.testing.assert_close(worker["logits"], expected, rtol=1e-5, atol=1e-5)
    for name, value in plain.state_dict().items():
        assert torch.equal(worker["state"][name], value), name
    assert worker["local"] < 0.6 * worker["total"]  # each rank holds about half


def test_fsdp_with_lora_and_activation_checkpointing_matches_one_process(tmp_path):
    common = {"train.max_steps": 2, "checkpoint.every": 0, "data.pad_to": "max_length", "data.extra_padding": 0, "lora.enabled": True,
              "model.gradient_checkpointing": True, "lora.r": 4, "lora.alpha": 8,
              "lora.dropout": 0.0, "optim.lr": 1e-2, "optim.eps": 1e-3}  # eps: see test_accumulation_...
    assert train.main(tiny_args(tmp_path, "single", **common, **{"train.micro_batch_size": 4})) == 0
    torchrun(tiny_args(tmp_path, "fsdp", **common, **{"train.micro_batch_size": 2, "parallel.mode": "fsdp"}))
    assert losses(tmp_path / "single") == pytest.approx(losses(tmp_path / "fsdp"), rel=1e-5)
    for run in ("single", "fsdp"):
        config = json.loads((tmp_path / run / "adapter" / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["r"] == 4
    single, sharded = export_weights(tmp_path / "single"), export_weights(tmp_path / "fsdp")
    for name in single:
        torch.testing.assert_close(single[name], sharded[name], rtol=1e-4, atol=1e-6)


def test_memory_estimate_matches_the_arithmetic():
    n = LLaDAConfig.from_name("llada-8b").num_params()
    full = parallel.estimate_memory(n, n, 8, "fsdp", frozen_bytes=2)
    assert full["weights"] == n * 4 / 8 and full["gradients"] == n * 4 / 8 and full["optimizer"] == n * 8 / 8
    assert full["total"] / 1e9 == pytest.approx(16.03, abs=0.01)  # 16 bytes per parameter over 8 GPUs
    ddp = parallel.estimate_memory(n, n, 8, "ddp", frozen_bytes=2)
    assert ddp["total"] / 1e9 == pytest.approx(128.25, abs=0.01)  # why 8B full fine-tuning needs FSDP
    lora_trainable = 83_886_080
    lora = parallel.estimate_memory(n, lora_trainable, 8, "ddp", frozen_bytes=2)
    assert lora["weights"] == (n - lora_trainable) * 2 + lora_trainable * 4


def test_exit_process_skips_teardown_while_gloo_is_up():
    """Under torchrun, gloo's threads can abort the process during interpreter teardown after all work is done;
    exit_process ends it with the code and the output flushed, without running that teardown."""
    script = ("import atexit, os, sys, torch.distributed as dist, parallel\n"
              "atexit.register(lambda: print('teardown ran', flush=True))\n"
              "if sys.argv[1] == 'dist':\n"
              "    dist.init_process_group('gloo', rank=0, world_size=1)\n"
              "print('work done', end='')\n"
              "parallel.exit_process(3)\n")
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), PYTHONPATH=str(ROOT))
    runs = {mode: subprocess.run([sys.executable, "-c", script, mode], env=env, capture_output=True, text=True,
                                 timeout=120) for mode in ("dist", "plain")}
    assert runs["dist"].returncode == 3 and runs["dist"].stdout == "work done"  # flushed, no teardown
    assert runs["plain"].returncode == 3 and "teardown ran" in runs["plain"].stdout  # no group: a normal exit
