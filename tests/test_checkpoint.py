"""Checkpoints: exact resume (full, LoRA), SIGKILL at random instants, SIGTERM, failing writes, keep_last, compatibility.

Every run is compared with one uninterrupted reference run per variant, bitwise: the tiny config on CPU in fp32,
with gradient accumulation and stratified t. Subprocesses are used only where a real signal is needed. Everything
runs on one thread (torch.set_num_threads here, OMP_NUM_THREADS in subprocesses): the arithmetic is then the same
in both, and a busy 2-core machine runs the tiny model ~100x faster than with competing OpenMP threads.
"""

import importlib.metadata
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import train
from tests.test_train import ROOT, tiny_args

N = 6  # optimizer steps of the in-process runs
N_LONG = 30  # of the runs that are signalled: long enough (~1-2 s of steps) to be hit at random instants
COMMON = {"train.max_steps": N, "train.micro_batch_size": 1, "train.grad_accum_steps": 2,
          "diffusion.time_sampling": "stratified", "checkpoint.every": 1, "checkpoint.keep_last": 2,
          "checkpoint.export": False, "optim.warmup_steps": 2}
LORA = {"lora.enabled": True, "lora.r": 4, "lora.alpha": 8, "lora.dropout": 0.1}  # dropout: the torch RNG matters
FILES = {"trainer.json", "model.safetensors", "optimizer.pt", "rng_rank0.pt"}


def args(data_dir: Path, run_dir: Path, **overrides: object) -> list[str]:
    return tiny_args(data_dir, "unused", **{**COMMON, "train.run_dir": str(run_dir), **overrides})


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ref(tmp_path_factory, one_thread) -> dict[str, Path]:
    """Uninterrupted runs: full, LoRA, and a longer full one; `data` holds the data files and token cache."""
    data = tmp_path_factory.mktemp("data")
    runs = {"data": data, "full": data / "ref_full", "lora": data / "ref_lora", "long": data / "ref_long"}
    assert train.main(args(data, runs["full"])) == 0
    assert train.main(args(data, runs["lora"], **LORA)) == 0
    assert train.main(args(data, runs["long"], **{"train.max_steps": N_LONG})) == 0
    return runs


def steps(run_dir: Path) -> list[int]:
    return [step for step, _ in checkpoint.complete_checkpoints(run_dir)]


def step_losses(run_dir: Path) -> dict[int, float]:
    """Loss per step from metrics.jsonl; a resumed run appends, and a step logged twice keeps its last value."""
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def assert_same_final_state(run_dir: Path, ref_dir: Path, n: int = N) -> None:
    """Weights, optimizer state and data position of the last step: bitwise equal."""
    got, want = run_dir / f"step_{n:06d}", ref_dir / f"step_{n:06d}"
    a, b = load_file(got / "model.safetensors"), load_file(want / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    opt_a = torch.load(got / "optimizer.pt", weights_only=False)["optimizer"]["state"]
    opt_b = torch.load(want / "optimizer.pt", weights_only=False)["optimizer"]["state"]
    for index in opt_b:
        for key in opt_b[index]:
            assert torch.equal(opt_a[index][key], opt_b[index][key]), (index, key)
    state_a, state_b = (json.loads((d / "trainer.json").read_text()) for d in (got, want))
    assert state_a["data"] == state_b["data"] and state_a["step"] == n


def assert_only_complete(run_dir: Path) -> None:
    """Every directory that looks like a checkpoint holds all of its files."""
    for entry in run_dir.glob("step_*"):
        if checkpoint.STEP_DIR.match(entry.name):
            assert FILES <= {p.name for p in entry.iterdir()}, entry


# ---------------------------------------------------------------------------------------------------------------
# Exact resume


@pytest.mark.parametrize("variant", ["full", "lora"])
def test_stop_and_resume_is_the_same_run(ref, tmp_path, variant):
    extra = dict(LORA) if variant == "lora" else {}
    if variant == "lora":  # eval and sampling between steps must not move the RNG that LoRA dropout draws from
        extra.update({"train.eval_every": 2, "log.sample_prompts": "3 1 2", "log.sample_gen_length": 8,
                      "log.sample_steps": 4})
    run = tmp_path / "run"
    assert train.main(args(ref["data"], run, **extra, **{"train.stop_at_step": N // 2})) == 0
    assert steps(run) == [N // 2 - 1, N // 2]  # stopped early, with the schedule of N steps
    assert max(step_losses(run)) == N // 2
    assert train.main(args(ref["data"], run, **extra)) == 0  # checkpoint.resume = "auto"
    assert_same_final_state(run, ref[variant])
    assert step_losses(run) == step_losses(ref[variant])  # every step's loss, exactly
    assert len(step_losses(run)) == N


# ---------------------------------------------------------------------------------------------------------------
# Killed at any instant


def start(ref: dict[str, Path], run: Path, log_name: str, **overrides: object) -> subprocess.Popen:
    """`python train.py` for N_LONG steps; stdout and stderr go to files next to the run directory."""
    run.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ROOT / "train.py"), *args(ref["data"], run, **{"train.max_steps": N_LONG, **overrides})]
    with open(run.parent / f"{log_name}.out", "w") as out, open(run.parent / f"{log_name}.err", "w") as err:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err,
                                env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))


def logged_steps(run: Path) -> int:
    path = run / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def wait_for(condition, proc: subprocess.Popen, timeout: float = 60.0) -> bool:
    """Poll until condition() holds (True) or the process exits first (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.001)
    raise AssertionError("timed out waiting for the training subprocess")


def test_sigkill_at_random_moments_then_resume_is_exact(ref, tmp_path):
    run, rng = tmp_path / "run", random.Random(8)
    mid_write_kills = 0
    for attempt, when in enumerate(["write", "random", "write", "random"]):
        proc = start(ref, run, f"attempt{attempt}")
        if when == "write":  # the moment a checkpoint directory is being written
            triggered = wait_for(lambda: any(run.glob("step_*.tmp")), proc)
        else:  # a random instant within a step or two after this attempt's first new step
            seen = logged_steps(run)
            triggered = wait_for(lambda: logged_steps(run) > seen, proc)
            time.sleep(rng.uniform(0.0, 0.5))
        proc.kill()
        proc.wait()
        if when == "write" and triggered and any(run.glob("step_*.tmp")):
            mid_write_kills += 1
        assert_only_complete(run)
        if steps(run):  # what the next attempt resumes from: a complete checkpoint, never the .tmp one
            assert checkpoint.resolve_resume("auto", run).name == f"step_{steps(run)[-1]:06d}"
    assert mid_write_kills >= 1, "no kill landed during a checkpoint write"
    proc = start(ref, run, "final")
    assert proc.wait(timeout=120) == 0, (tmp_path / "final.err").read_text()[-2000:]
    out = (tmp_path / "final.out").read_text()
    assert "resumed from" in out and ".tmp" not in out.split("resumed from")[1].splitlines()[0]
    assert not list(run.glob("step_*.tmp"))  # the stale one was removed at start
    assert_same_final_state(run, ref["long"], N_LONG)


def test_sigterm_saves_and_exits_within_a_step(ref, tmp_path):
    run = tmp_path / "run"
    proc = start(ref, run, "term", **{"checkpoint.every": 0})
    assert wait_for(lambda: logged_steps(run) >= 1, proc), "the run ended before it could be signalled"
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    seen = logged_steps(run)  # read after sending: the run stops at the end of the step in progress, at most seen + 1
    assert proc.wait(timeout=30) == 0
    assert time.monotonic() - sent < 30
    out, err = (tmp_path / "term.out").read_text(), (tmp_path / "term.err").read_text()
    assert "SIGTERM received" in err
    (stopped,) = steps(run)
    assert 1 <= stopped <= seen + 1 and stopped < N_LONG  # the step in progress was finished, no more
    assert f"SIGTERM: checkpoint saved at step {stopped}; exiting" in out
    assert_only_complete(run)
    assert train.main(args(ref["data"], run, **{"train.max_steps": N_LONG})) == 0
    assert_same_final_state(run, ref["long"], N_LONG)


def test_second_sigterm_exits_at_once(ref, tmp_path):
    run = tmp_path / "run"
    proc = start(ref, run, "term2", **{"checkpoint.every": 0})
    assert wait_for(lambda: logged_steps(run) >= 1, proc)
    proc.send_signal(signal.SIGTERM)
    assert wait_for(lambda: "SIGTERM received" in (tmp_path / "term2.err").read_text(), proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert "second SIGTERM: exiting now" in (tmp_path / "term2.err").read_text()


# ---------------------------------------------------------------------------------------------------------------
# A failing write, keep_last, stale directories, compatibility


def test_failed_write_leaves_earlier_checkpoints_and_resumes(ref, tmp_path, monkeypatch, capsys):
    run, real_save, calls = tmp_path / "run", torch.save, []

    def disk_full_on_second_optimizer_save(obj, path, *a, **k):
        if Path(path).name == "optimizer.pt":
            calls.append(path)
            if len(calls) == 2:
                assert (Path(path).parent / "model.safetensors").is_file()  # part of the checkpoint is written
                raise OSError(28, "No space left on device")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", disk_full_on_second_optimizer_save)
    assert train.main(args(ref["data"], run, **{"checkpoint.every": 2})) == 1
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(error) == 1
    assert "step_000004" in error[0] and "No space left on device" in error[0]
    assert "earlier checkpoints are intact" in error[0]
    assert sorted(p.name for p in run.glob("step_*")) == ["step_000002"]  # no partial or .tmp directory
    assert_only_complete(run)
    monkeypatch.setattr(torch, "save", real_save)
    assert train.main(args(ref["data"], run, **{"checkpoint.every": 2})) == 0
    assert_same_final_state(run, ref["full"])


def test_keep_last_and_stale_directories_are_ignored(ref, tmp_path, capsys):
    assert steps(ref["full"]) == [N - 1, N]  # checkpoint.keep_last = 2 of N
    run = tmp_path / "run"
    shutil.copytree(ref["full"], run)
    # Looks complete inside, but the rename never happened: a crash mid-write, or mid-delete.
    shutil.copytree(run / f"step_{N:06d}", run / "step_000009.tmp")
    shutil.copytree(run / f"step_{N:06d}", run / "step_000008.old")
    assert checkpoint.resolve_resume("auto", run) == run / f"step_{N:06d}"
    assert train.main(args(ref["data"], run)) == 0
    assert f"resumed from {run / f'step_{N:06d}'} at step {N}" in capsys.readouterr().out
    assert sorted(p.name for p in run.glob("step_*")) == [f"step_{N - 1:06d}", f"step_{N:06d}"]


def test_resume_with_a_different_batch_shape_fails_before_training(ref, tmp_path, capsys):
    run = tmp_path / "run"
    changed = {"checkpoint.resume": str(ref["full"] / f"step_{N:06d}"), "train.micro_batch_size": 2,
               "data.max_length": 48}
    assert train.main(args(ref["data"], run, **changed)) == 1
    err = capsys.readouterr().err
    assert "cannot resume" in err and "train.micro_batch_size: checkpoint 1, now 2" in err
    assert "data.max_length: checkpoint 64, now 48" in err
    assert not (run / "metrics.jsonl").exists() and not (run / "config.json").exists() and not steps(run)
    assert train.main(args(ref["data"], run, **{"checkpoint.resume": str(run)})) == 1
    assert "not a complete checkpoint" in capsys.readouterr().err


def test_checkpoint_holds_everything_listed(ref):
    path = ref["lora"] / f"step_{N:06d}"
    state = json.loads((path / "trainer.json").read_text())
    assert state["step"] == N and set(state["data"]) == {"epoch", "offset"}
    assert state["config"]["lora"]["r"] == 4 and state["config"]["train"]["grad_accum_steps"] == 2
    assert state["versions"]["torch"] == importlib.metadata.version("torch") and "python" in state["versions"]
    weights = load_file(path / "model.safetensors")
    assert weights and all("lora_" in name for name in weights)  # LoRA: the adapter alone
    rng = torch.load(path / "rng_rank0.pt", weights_only=False)
    assert {"python", "numpy", "torch"} <= set(rng)


def test_rewinding_replaces_the_later_checkpoints(tmp_path, capsys):
    """After resuming from an earlier checkpoint, the first save removes the abandoned run's later ones, so neither
    keep_last nor resume="auto" mistakes them for this run's."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())

    def save(step: int) -> Path:
        return checkpoint.save_checkpoint(tmp_path, step, model=model, optimizer=optimizer, scaler=None,
                                          trainer_state={"step": step}, keep_last=2)

    for step in (1, 2, 3, 4):
        save(step)
    assert steps(tmp_path) == [3, 4]
    with torch.no_grad():
        model.weight.add_(1.0)
    save(3)  # resumed from a copy of step 2, say, and reached step 3 again
    assert steps(tmp_path) == [3] and "a later checkpoint of the run this one replaced" in capsys.readouterr().out
    assert torch.equal(load_file(tmp_path / "step_000003" / "model.safetensors")["weight"], model.weight)
    assert not [p for p in tmp_path.iterdir() if not checkpoint.STEP_DIR.match(p.name)]  # no .tmp or .old left
