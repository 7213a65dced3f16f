"""Distributed plumbing for train.py: process-group setup, DDP or FSDP2 wrapping, sharded loading, memory estimate.

Everything here is plain torch.distributed. torchrun sets RANK, LOCAL_RANK and WORLD_SIZE (and MASTER_ADDR/PORT);
nothing assumes a single node: the device is chosen by LOCAL_RANK, everything else uses the global RANK.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed() -> Dist:
    """One process, or one of WORLD_SIZE under torchrun: NCCL on CUDA, gloo on CPU."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if "RANK" in os.environ and not dist.is_initialized():  # under torchrun, even with one process (FSDP needs it)
        # On GPUs, gloo serves the CPU-tensor collectives that torch.distributed.checkpoint issues beside NCCL.
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30), **kwargs)
    return Dist(rank, local_rank, world_size, device)


def close_distributed() -> None:
    """Wait for every rank, then tear down NCCL. A gloo group is left alone (see exit_process): destroying it
    right after the last collective sometimes aborts the process ("terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        if "nccl" in dist.get_backend():
            dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End a worker with `code`. While a gloo group is alive, skip interpreter teardown (os._exit): gloo's threads,
    destroyed there, sometimes abort the process the same way, after every file is written and closed, which turned
    finished runs into exit code -6 under torchrun. Call it last, with all output flushed here."""
    if dist.is_available() and dist.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few scalars over ranks (float64 so token counts stay exact)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


# ---------------------------------------------------------------------------------------------------------------
# Which mode, and what each GPU holds


def estimate_memory(n_params: int, n_trainable: int, world_size: int, mode: str, frozen_bytes: int) -> dict:
    """Bytes per rank for weights, gradients and AdamW state (activations not included).

    Trainable weights are fp32 masters (4 B), their gradients fp32 (4 B), AdamW's two moments fp32 (8 B):
    16 B per trainable parameter. Frozen weights cost `frozen_bytes` each (2 for bf16). DDP replicates all of it;
    FSDP divides all of it by the number of ranks (plus one gathered block at a time, not counted here).
    """
    shard = world_size if mode == "fsdp" else 1
    frozen = n_params - n_trainable
    estimate = {
        "weights": (n_trainable * 4 + frozen * frozen_bytes) / shard,
        "gradients": n_trainable * 4 / shard,
        "optimizer": n_trainable * 8 / shard,
    }
    estimate["total"] = sum(estimate.values())
    return estimate


def format_memory(estimate: dict, mode: str, world_size: int) -> str:
    gib = 2**30
    unit, scale = ("GiB", gib) if estimate["total"] >= gib else ("MiB", 2**20)
    parts = ", ".join(f"{k} {v / scale:.2f} {unit}" for k, v in estimate.items())
    return f"memory per rank ({mode}, {world_size} rank{'s' if world_size > 1 else ''}): {parts}"


def choose_mode(mode: str, n_params: int, n_trainable: int, device: torch.device, world_size: int,
                frozen_bytes: int) -> str:
    """ddp or fsdp; "auto" picks FSDP when the DDP replica would not fit in 85% of one GPU."""
    if mode not in ("auto", "ddp", "fsdp"):
        raise ValueError(f"parallel.mode: unknown mode '{mode}' (auto, ddp, fsdp)")
    if mode != "auto":
        return mode
    if device.type != "cuda" or world_size == 1:
        return "ddp"
    need = estimate_memory(n_params, n_trainable, world_size, "ddp", frozen_bytes)["total"]
    return "fsdp" if need > 0.85 * torch.cuda.get_device_properties(device).total_memory else "ddp"


# ---------------------------------------------------------------------------------------------------------------
# FSDP2


def apply_fsdp(model: nn.Module, param_dtype: torch.dtype | None, reshard_after_forward: bool) -> nn.Module:
    """fully_shard each block, then the root (embedding, final norm and LM head). Master weights stay fp32 and
    sharded; compute happens in `param_dtype` (bf16), gradients are reduce-scattered in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.model.transformer.blocks:
        fully_shard(block, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    # The root's parameters are used again right after forward (the LM head in the loss), so keep them gathered.
    fully_shard(model, mp_policy=policy, reshard_after_forward=False)
    return model


def load_full_into_sharded(model: nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Copy full (e.g. mmap-backed) tensors into the model's sharded parameters, each rank reading only its part.

    FSDP2 shards every parameter on dim 0 in torch.chunk pieces; a rank copies just its piece (cast to the
    parameter's dtype, moved to its device), so its memory holds its shard plus one slice in flight, and the
    rest of the file is never read. Other placements fall back to distribute_tensor."""
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    with torch.no_grad():
        for name, param in model.named_parameters():
            if name not in full:
                continue
            value = full[name]
            if not isinstance(param, DTensor):
                param.copy_(value)
            elif list(param.placements) == [Shard(0)]:
                pieces = torch.chunk(value, param.device_mesh.size(), dim=0)
                rank = param.device_mesh.get_local_rank()
                local = param.to_local()
                if local.numel():
                    local.copy_(pieces[rank])
            else:
                param.to_local().copy_(distribute_tensor(value.to(param.dtype), param.device_mesh,
                                                         param.placements, src_data_rank=None).to_local())


def gather_full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) state dict on CPU, on rank 0 only (empty elsewhere); works for plain, DDP and FSDP models."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not (dist.is_available() and dist.is_initialized()):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP (FSDP2 modifies the module in place, so it needs no unwrapping)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
