"""Training checkpoints: exact resume, atomic writes, preemption.

A checkpoint is a directory `run_dir/step_000200/`. Everything a resumed run needs is listed here, in one place:

    trainer.json        step, data iterator position, skipped-step counters, the resolved config, package versions
                        (written last: its presence inside a renamed directory marks the checkpoint complete)
    model.safetensors   the trainable weights in fp32: the whole model for full fine-tuning, the adapter for LoRA
                        (frozen base weights come back from `model.path`; they never change)
    optimizer.pt        AdamW state and, with fp16, the GradScaler state
    dcp/                FSDP only: model and optimizer, sharded, via torch.distributed.checkpoint (replaces the
                        two files above, so no rank ever gathers the whole training state)
    scaler.pt           FSDP with fp16 only: the GradScaler state
    rng_rank{r}.pt      every RNG rank r uses: Python, numpy, torch CPU and CUDA (LoRA dropout draws from torch's).
                        The generators that draw t and the masks are not stored: they are re-seeded from
                        (seed, step, sample slot) every step, so the step number restores them.

Writes go to `step_000200.tmp/`; each rank fsyncs what it wrote, rank 0 writes trainer.json, fsyncs the directory
and renames it, so a crash mid-write leaves at worst a `.tmp` directory, which resume ignores and the next run
removes. Checkpoints beyond `keep_last`, and any of a later step (left by a run this one rewound), are deleted only
after the new one is renamed into place, and a directory is always renamed to `.old` before it is deleted, so a
crash mid-delete never leaves a `step_XXXXXX/` that looks complete but is not.
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
    """Saving failed (or a resume path is not a checkpoint); the previous checkpoints are untouched."""


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
    """Delete `.tmp` (crash during a write) and `.old` (crash during a delete) directories; rank 0, before training."""
    for pattern in ("step_*.tmp", "step_*.old"):
        for entry in Path(run_dir).glob(pattern):
            shutil.rmtree(entry, ignore_errors=True)


def _delete(path: Path) -> None:
    """Rename, then delete: a crash part way leaves a `.old` directory, never a broken `step_XXXXXX/`."""
    doomed = path.with_name(path.name + ".old")
    if doomed.exists():
        shutil.rmtree(doomed)
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


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
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


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
    """Write step_{step:06d}/ atomically on all ranks; returns its path. Raises CheckpointWriteError on failure.

    Every rank takes part in the same collectives whatever fails where, so a failure on one rank stops all of
    them with the same error instead of leaving the others waiting.
    """
    run_dir = Path(run_dir)
    final = run_dir / f"step_{step:06d}"
    tmp = run_dir / f"step_{step:06d}.tmp"

    def fresh_tmp() -> None:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)

    def write_parts() -> None:
        written = [tmp / f"rng_rank{rank}.pt"]
        if fsdp:  # collective; the storage writer fsyncs its own files
            _save_sharded(tmp / "dcp", model, optimizer)
            if rank == 0 and scaler is not None:
                torch.save(scaler.state_dict(), tmp / "scaler.pt")
                written.append(tmp / "scaler.pt")
        elif rank == 0:
            save_file(trainable_state_dict(model), tmp / "model.safetensors")
            torch.save({"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else None},
                       tmp / "optimizer.pt")
            written += [tmp / "model.safetensors", tmp / "optimizer.pt"]
        torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
        for path in written:  # each rank flushes its own files: on a shared filesystem only the writer can
            _fsync_file(path)

    def commit() -> None:  # rank 0, once every rank's part is on disk
        (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=2, default=str))
        _fsync_file(tmp / "trainer.json")
        for directory in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
            _fsync_dir(directory)
        if final.exists():  # a stale copy of this step (resumed from an earlier one): replace it
            _delete(final)
        os.rename(tmp, final)
        _fsync_dir(run_dir)

    error = _attempt(fresh_tmp) if rank == 0 else None
    ok = _all_ok(error is None)  # also the barrier: the directory exists before any rank writes into it
    if ok:
        error = _attempt(write_parts)
        ok = _all_ok(error is None)
    if ok:
        error = _attempt(commit) if rank == 0 else None
        ok = _all_ok(error is None)
    if not ok:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        reason = f"{type(error).__name__}: {error}" if error else "another rank failed to write its part"
        raise CheckpointWriteError(f"saving checkpoint {final} failed ({reason}); earlier checkpoints are intact")
    if rank == 0:
        found = complete_checkpoints(run_dir)
        # Later steps belong to a run this one does not continue (it resumed from an earlier checkpoint): left in
        # place, resume="auto" would pick them up after the next crash, and keep_last would delete ours instead.
        later = [path for s, path in found if s > step]
        ours = [path for s, path in found if s <= step]
        for old in later + (ours[:-keep_last] if keep_last > 0 else []):
            try:
                if old in later:
                    print(f"removing {old}: a later checkpoint of the run this one replaced", flush=True)
                _delete(old)
            except OSError as exc:  # the new checkpoint is safe; a leftover old one is only clutter
                print(f"warning: could not delete old checkpoint {old}: {exc}", file=sys.stderr, flush=True)
    _barrier()
    return final


def _attempt(fn: Any) -> BaseException | None:
    """Run fn; return the exception it raised (disk full, permissions, a failing storage writer), or None."""
    try:
        fn()
    except Exception as exc:
        return exc
    return None


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
        if scaler is not None and (path / "scaler.pt").is_file():
            scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=False))
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


_previous_handlers: dict[int, Any] = {}


def restore_signal_handlers() -> None:
    """Put back the handlers StopSignal.install replaced (train.main called in-process, e.g. by tests)."""
    while _previous_handlers:
        sig, handler = _previous_handlers.popitem()
        signal.signal(sig, handler)


class StopSignal:
    """The first SIGTERM/SIGINT asks the loop to finish its optimizer step, save and exit; a second exits at once."""

    def __init__(self) -> None:
        self.requested = False
        self.name = ""

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            _previous_handlers.setdefault(sig, signal.signal(sig, self._handle))

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

