"""Training checkpoints: exact resume, atomic writes, preemption.

A checkpoint is a directory `run_dir/step_000200/`. Everything a resumed run needs is listed here, in one place:

    trainer.json        step, data iterator position, skipped-step counters, the resolved config, package versions
                        (written last: its presence inside a renamed directory marks the checkpoint complete)
    model.safetensors   the trainable weights in fp32: the whole model for full fine-tuning, the adapter for LoRA
                        (frozen base weights come back from `model.path`; they never change)
    optimizer.pt        AdamW state and, with fp16, the GradScaler state
    dcp/                FSDP only: model and optimizer, sharded, via torch.distributed.checkpoint (replaces the
                        two files above, so no rank ever gathers the whole training state)
    rng_rank{r}.pt      every RNG rank r uses: Python, numpy, torch CPU and CUDA. The generators that draw t and
                        the masks are not stored: they are re-seeded from (seed, step, sample slot) every step.

Writes go to `step_000200.tmp/`, every file is fsynced, and the directory is renamed only when complete, so a
crash mid-write leaves at worst a `.tmp` directory, which is ignored and removed by the next run. Older
checkpoints beyond `keep_last` are deleted only after the new one is renamed into place.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

STEP_DIR = re.compile(r"^step_(\d{6,})$")


class CheckpointWriteError(RuntimeError):
    """Saving failed; the previous checkpoints are untouched."""


# ---------------------------------------------------------------------------------------------------------------
# Finding checkpoints


def complete_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint in run_dir, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for entry in run_dir.iterdir():
        match = STEP_DIR.match(entry.name)
        if match and (entry / "trainer.json").is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def resolve_resume(resume: str, run_dir: str | Path) -> Path | None:
    """`resume` is "auto" (newest complete checkpoint in run_dir, or a fresh start), "" (fresh start) or a path."""
    if resume in ("", "none"):
        return None
    if resume == "auto":
        found = complete_checkpoints(run_dir)
        return found[-1][1] if found else None
    path = Path(resume)
    if not (path / "trainer.json").is_file():
        raise CheckpointWriteError(f"checkpoint.resume: {resume} is not a complete checkpoint (no trainer.json)")
    return path


def remove_incomplete(run_dir: str | Path) -> None:
    """Delete `.tmp` directories left by a crash during a write (rank 0 only, before training)."""
    for entry in Path(run_dir).glob("step_*.tmp"):
        shutil.rmtree(entry, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# RNG state


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------------------------
# Saving


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _all_ok(ok: bool) -> bool:
    """True on every rank only if every rank succeeded (so all ranks agree whether the save happened)."""
    if not (dist.is_available() and dist.is_initialized()):
        return ok
    flag = torch.tensor([0 if ok else 1], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag)
    return int(flag.item()) == 0


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Checkpoint keys are the plain model's, not DDP's `module.`-prefixed ones."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights a checkpoint must hold: every parameter that trains (all of them, or only LoRA's)."""
    model = _unwrap(model)
    return {name: p.detach().float().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    trainer_state: dict[str, Any],
    keep_last: int,
    fsdp: bool = False,
    rank: int = 0,
) -> Path:
    """Write step_{step:06d}/ atomically on all ranks; returns its path. Raises CheckpointWriteError on failure."""
    run_dir = Path(run_dir)
    final = run_dir / f"step_{step:06d}"
    tmp = run_dir / f"step_{step:06d}.tmp"
    error: BaseException | None = None
    try:
        if rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        _barrier()
        if fsdp:
            _save_sharded(tmp / "dcp", model, optimizer)
        elif rank == 0:
            save_file(trainable_state_dict(model), tmp / "model.safetensors")
            torch.save(
                {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else None},
                tmp / "optimizer.pt",
            )
        torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    except (OSError, RuntimeError) as exc:  # disk full, permissions, a failing storage writer
        error = exc
    ok = _all_ok(error is None)
    if ok and rank == 0:
        try:
            (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=2, default=str))
            for path in tmp.rglob("*"):
                if path.is_file():
                    _fsync_file(path)
            if final.exists():  # a stale copy of this step (resumed past it, then crashed): replace it
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(run_dir)
        except OSError as exc:
            error, ok = exc, False
    ok = _all_ok(ok)
    if not ok:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        reason = f"{type(error).__name__}: {error}" if error else "another rank failed to write its part"
        raise CheckpointWriteError(f"saving checkpoint {final} failed ({reason}); earlier checkpoints are intact")
    if rank == 0 and keep_last > 0:
        for _, old in complete_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _save_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(ignore_frozen_params=True)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(path))


# ---------------------------------------------------------------------------------------------------------------
# Loading


def load_checkpoint(
    path: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    fsdp: bool = False,
    rank: int = 0,
) -> dict[str, Any]:
    """Restore weights, optimizer, scaler and this rank's RNGs; returns trainer.json's contents."""
    path = Path(path)
    trainer_state = json.loads((path / "trainer.json").read_text())
    if fsdp:
        _load_sharded(path / "dcp", model, optimizer)
    else:
        weights = load_file(path / "model.safetensors")
        model = _unwrap(model)
        expected = {name for name, p in model.named_parameters() if p.requires_grad}
        if set(weights) != expected:
            missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
            raise CheckpointWriteError(
                f"{path / 'model.safetensors'}: weights do not match the model's trainable parameters "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)
        saved = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
        optimizer.load_state_dict(saved["optimizer"])
        if scaler is not None and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
    rng_file = path / f"rng_rank{rank}.pt"
    if rng_file.is_file():  # absent when resuming on more ranks than saved: those ranks keep their fresh seeds
        set_rng_state(torch.load(rng_file, weights_only=False))
    return trainer_state


def _load_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    options = StateDictOptions(ignore_frozen_params=True)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=options)


def config_differences(saved: dict[str, Any], current: dict[str, Any], keys: list[str]) -> list[str]:
    """Dotted config keys (section.key) whose values differ between a checkpoint and this run."""
    differences = []
    for dotted in keys:
        section, key = dotted.split(".")
        old, new = saved.get(section, {}).get(key), current.get(section, {}).get(key)
        if old != new:
            differences.append(f"{dotted}: checkpoint {old!r}, now {new!r}")
    return differences


# ---------------------------------------------------------------------------------------------------------------
# Preemption: SIGTERM (SLURM, torchrun) and SIGINT (Ctrl-C)


class StopSignal:
    """The first SIGTERM/SIGINT asks the loop to finish its optimizer step, save and exit; a second exits at once."""

    def __init__(self) -> None:
        self.requested = False
        self.name = ""

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            print(f"\nsecond {signal.Signals(signum).name}: exiting now without a checkpoint", file=sys.stderr,
                  flush=True)
            os._exit(128 + signum)
        self.requested = True
        self.name = signal.Signals(signum).name
        print(f"\n{self.name} received: finishing this step, then saving a checkpoint and exiting "
              f"(send it again to exit at once)", file=sys.stderr, flush=True)

    def any_rank(self, device: torch.device) -> bool:
        """All ranks stop together if any rank was signalled."""
        if not (dist.is_available() and dist.is_initialized()):
            return self.requested
        flag = torch.tensor([1 if self.requested else 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def package_versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "safetensors", "tokenizers", "numpy"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return versions

