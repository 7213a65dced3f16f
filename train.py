"""Supervised fine-tuning of masked diffusion language models (LLaDA), in one readable loop.

    python train.py configs/tiny.toml                                   # CPU demo
    torchrun --nproc_per_node=8 train.py configs/llada.toml             # LLaDA-8B-Instruct on 8 GPUs
    python train.py configs/tiny.toml optim.lr=3e-4 train.max_steps=50  # section.key=value overrides

Phases: config -> distributed init -> tokenizer and data -> model -> LoRA -> DDP/FSDP wrap -> optimizer ->
resume -> loop (noise, loss, backward, step, log, eval, checkpoint) -> export.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import checkpoint
import diffusion
import parallel
from config import ConfigError, config_to_dict, load_config
from data import Batch, BatchIterator, DataConfig, DataError, build_datasets, load_tokenizer, special_token_ids
from diffusion import DiffusionConfig
from lora import LoRAConfig
from model import LLaDA, LLaDAConfig, read_safetensors_dir, training_flops_per_token

# ---------------------------------------------------------------------------------------------------------------
# Config: one dataclass per TOML section. Precedence: command line > TOML file > the defaults below.


@dataclass
class ModelConfig:
    path: str = ""  # HF-layout checkpoint dir (config.json + safetensors); "" = random init of `size`
    size: str = "tiny"  # named size in model.MODEL_SIZES, used only when path is ""
    tokenizer: str = ""  # tokenizer dir; "" = the model path
    dtype: str = "auto"  # dtype of FROZEN weights: auto (bf16 for LoRA on GPU, else fp32) | bf16 | fp32
    gradient_checkpointing: bool = False  # recompute each block in backward: far less activation memory
    compile: bool = False  # torch.compile each block (GPU; slower to start, faster steps)


@dataclass
class OptimConfig:
    lr: float = 1e-5  # peak learning rate
    weight_decay: float = 0.1  # applied to matrices only (not norms)
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    warmup_steps: int = 0  # linear warmup from 0
    schedule: str = "linear"  # after warmup: linear | cosine | constant
    min_lr_ratio: float = 0.0  # final lr = lr * min_lr_ratio
    max_grad_norm: float = 1.0  # clip the global gradient norm; 0 = no clipping


@dataclass
class TrainConfig:
    run_dir: str = "runs/llada"  # checkpoints, metrics.jsonl, config.json and the exported model go here
    micro_batch_size: int = 1  # sequences per GPU per forward pass
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    max_steps: int = 0  # optimizer steps; 0 = derive from epochs
    epochs: float = 20.0  # used when max_steps is 0
    seed: int = 42  # model init, data order, t and masks
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
    max_bad_steps: int = 10  # stop after this many consecutive steps with a non-finite loss or grad norm
    eval_every: int = 100  # steps between validation estimates (diffusion.eval_draws masks per sequence); 0 = never
    # Checkpoint and exit after this step, as on SIGTERM, while the LR schedule still runs to max_steps, so a
    # resumed run continues the same run (time-boxed jobs, resume tests); 0 = run to the end.
    stop_at_step: int = 0


@dataclass
class CheckpointConfig:
    every: int = 100  # steps between checkpoints; 0 = only at the end and on SIGTERM
    keep_last: int = 20  # complete checkpoints to keep
    resume: str = "auto"  # auto (newest in run_dir, or fresh) | none | path to a step_XXXXXX directory
    export: bool = True  # save_pretrained (or the LoRA adapter) into run_dir/final at the end
    export_dtype: str = "auto"  # auto (the loaded checkpoint's dtype, fp32 from scratch) | bf16 | fp32


@dataclass
class LogConfig:
    every: int = 10  # steps between log lines and metrics.jsonl records
    progress: bool = True  # tqdm bar on rank 0
    tensorboard: bool = False  # also write TensorBoard events (if tensorboard is installed)
    sample_prompts: list[str] = field(default_factory=list)  # generated at each eval and written to the log
    sample_gen_length: int = 64
    sample_steps: int = 64
    peak_tflops: float = 0.0  # per-device peak for MFU; 0 = datasheet bf16 figure for known GPUs, no MFU on CPU


@dataclass
class ParallelConfig:
    mode: str = "auto"  # auto (fsdp when full fine-tuning would not fit per GPU) | ddp | fsdp
    reshard_after_forward: bool = True  # FSDP: free gathered weights after forward (less memory, more traffic)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


# ---------------------------------------------------------------------------------------------------------------
# Small helpers


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Learning rate as a pure function of the step: linear warmup, then linear/cosine decay or constant."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    if cfg.schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif cfg.schedule == "linear":
        decay = 1.0 - progress
    else:
        raise ConfigError(f"optim.schedule: unknown schedule '{cfg.schedule}' (linear, cosine, constant)")
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay)


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only; fused kernel on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
        fused=device.type == "cuda",
    )


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("bf16", "fp16", "fp32"):
        raise ConfigError(f"train.precision: unknown precision '{precision}' (auto, bf16, fp16, fp32)")
    return precision


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class MetricsLog:
    """metrics.jsonl (one JSON record per log step) and optional TensorBoard, rank 0 only."""

    def __init__(self, run_dir: Path, tensorboard: bool, enabled: bool) -> None:
        self.enabled = enabled
        self.file = open(run_dir / "metrics.jsonl", "a") if enabled else None
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                print("log.tensorboard: tensorboard is not installed; writing metrics.jsonl only")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


# ---------------------------------------------------------------------------------------------------------------
# Model: load or build, LoRA, wrap


def build_model(cfg: Config, tokenizer: Any, env: parallel.Dist, mode: str) -> tuple[LLaDA, torch.dtype]:
    """The unwrapped model on its device with trainable weights in fp32; returns it and the export dtype."""
    import lora as lora_lib

    frozen_dtype = DTYPES["fp32"]
    if cfg.lora.enabled:  # only LoRA weights train: the base may be bf16 to halve its memory
        wanted = cfg.model.dtype if cfg.model.dtype != "auto" else ("bf16" if env.device.type == "cuda" else "fp32")
        if wanted not in DTYPES:
            raise ConfigError(f"model.dtype: unknown dtype '{wanted}' (auto, bf16, fp32)")
        frozen_dtype = DTYPES[wanted]
    fsdp_meta = mode == "fsdp" and bool(cfg.model.path)
    if cfg.model.path:
        if fsdp_meta:  # every rank builds on meta and later loads only its shard
            config = LLaDAConfig.from_json(Path(cfg.model.path) / "config.json")
            with torch.device("meta"):
                model = LLaDA(config)
            model.source_dir = cfg.model.path
        else:
            model = LLaDA.from_pretrained(cfg.model.path, dtype=frozen_dtype, device=env.device)
        export_dtype = _checkpoint_dtype(model.config)
    else:
        ids = special_token_ids(tokenizer)
        vocab = len(tokenizer)
        config = LLaDAConfig.from_name(
            cfg.model.size, vocab_size=vocab, embedding_size=(vocab + 63) // 64 * 64, mask_token_id=ids["mask"],
            eos_token_id=ids["eos"], pad_token_id=ids["pad"],
        )
        model = LLaDA.from_config(config, dtype=frozen_dtype, device=env.device, seed=cfg.train.seed)
        model.source_dir = cfg.model.tokenizer  # so the export carries the tokenizer files
        export_dtype = torch.float32
    if cfg.checkpoint.export_dtype != "auto":
        export_dtype = DTYPES[cfg.checkpoint.export_dtype]
    model.gradient_checkpointing = cfg.model.gradient_checkpointing

    if cfg.lora.enabled:  # A drawn from a generator seeded by train.seed: identical on every rank and every run
        lora_lib.apply_lora(model, cfg.lora, seed=cfg.train.seed)
    else:
        model.requires_grad_(True)
    return model, export_dtype


def _checkpoint_dtype(config: LLaDAConfig) -> torch.dtype:
    name = str(config.extra.get("torch_dtype", "float32")).replace("torch.", "")
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, torch.float32)


def wrap_model(model: LLaDA, cfg: Config, env: parallel.Dist, mode: str, precision: str) -> torch.nn.Module:
    if cfg.model.compile:
        for block in model.model.transformer.blocks:
            block.compile()
    if mode == "fsdp":
        parallel.apply_fsdp(model, DTYPES[precision] if precision != "fp32" else None,
                            cfg.parallel.reshard_after_forward)
        if cfg.model.path:
            model.to_empty(device=env.device)
            parallel.load_full_into_sharded(model, read_safetensors_dir(cfg.model.path))
            if cfg.lora.enabled:  # LoRA tensors were created on meta: give them the values a plain run would draw
                parallel.load_full_into_sharded(model, _fresh_lora_values(model, cfg))
        return model
    if env.distributed:
        ids = [env.local_rank] if env.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return model


def _fresh_lora_values(model: LLaDA, cfg: Config) -> dict[str, torch.Tensor]:
    """The initial LoRA tensors inject_lora draws (A from the seeded generator in layer order, B zero), or the
    adapter being continued, as full tensors to be sliced into FSDP shards."""
    import lora as lora_lib

    if cfg.lora.adapter:
        return {k.removeprefix(lora_lib.PEFT_PREFIX): v for k, v in
                lora_lib.read_adapter_weights(cfg.lora.adapter).items()}
    generator = torch.Generator().manual_seed(cfg.train.seed)
    values = {}
    for name, layer in lora_lib.lora_layers(model).items():
        a = torch.empty(layer.r, layer.in_features)
        torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        values[f"{name}.lora_A.weight"] = a
        values[f"{name}.lora_B.weight"] = torch.zeros(layer.out_features, layer.r)
    return values


# ---------------------------------------------------------------------------------------------------------------
# The run


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    try:
        cfg = load_config(Config, args[0], args[1:])
        return train(cfg)
    except (ConfigError, DataError, checkpoint.CheckpointWriteError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        checkpoint.restore_signal_handlers()


def train(cfg: Config) -> int:
    # --- distributed init --------------------------------------------------------------------------------------
    env = parallel.init_distributed()
    print0 = print if env.is_main else (lambda *a, **k: None)
    precision = resolve_precision(cfg.train.precision, env.device)
    run_dir = Path(cfg.train.run_dir)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.remove_incomplete(run_dir)
        print0("resolved config:\n" + json.dumps(config_to_dict(cfg), indent=2))
    torch.manual_seed(cfg.train.seed)

    # --- resume target, checked before any expensive loading -------------------------------------------------------
    resume_path = checkpoint.resolve_resume(cfg.checkpoint.resume, run_dir)
    saved_state = None
    if resume_path is not None:
        saved_state = json.loads((resume_path / "trainer.json").read_text())
        must_match = ["model.path", "model.size", "data.train_files", "data.max_length", "data.pad_to",
                      "train.micro_batch_size", "train.grad_accum_steps", "train.seed", "lora.enabled", "lora.r",
                      "lora.targets", "diffusion.time_sampling", "diffusion.complementary"]
        differences = checkpoint.config_differences(saved_state["config"], config_to_dict(cfg), must_match)
        if saved_state.get("world_size", env.world_size) != env.world_size:
            differences.append(f"world size: checkpoint {saved_state['world_size']}, now {env.world_size} "
                               f"(the global batch would change)")
        if differences:
            raise ConfigError(f"cannot resume from {resume_path}: the config differs: " + "; ".join(differences))

    # --- tokenizer and data --------------------------------------------------------------------------------------
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path)
    train_set, eval_set = build_datasets(cfg.data, tokenizer, rank=env.rank, world_size=env.world_size, log=print0,
                                         micro_batch_size=cfg.train.micro_batch_size)
    pad_id = special_token_ids(tokenizer)["pad"]
    micro_bs, accum = cfg.train.micro_batch_size, cfg.train.grad_accum_steps
    global_batch = micro_bs * accum * env.world_size
    batches = BatchIterator.from_config(train_set, cfg.data, micro_bs, rank=env.rank, world_size=env.world_size,
                                        pad_id=pad_id)
    total_steps = cfg.train.max_steps or math.ceil(cfg.train.epochs * batches.steps_per_epoch / accum)
    print0(f"{len(train_set)} training samples, global batch {global_batch} "
           f"({micro_bs} x {accum} accumulation x {env.world_size} ranks), {total_steps} steps")

    # --- model, LoRA, wrapping, optimizer --------------------------------------------------------------------------
    n_params_meta = LLaDAConfig.from_json(Path(cfg.model.path) / "config.json").num_params() if cfg.model.path \
        else None
    mode = parallel.choose_mode(cfg.parallel.mode, n_params_meta or 0, 0 if cfg.lora.enabled else (n_params_meta or 0),
                                env.device, env.world_size, 2 if cfg.lora.enabled else 4)
    if mode == "fsdp" and not dist.is_initialized():
        raise ConfigError("parallel.mode = fsdp: launch with torchrun (also for a single process)")
    model, export_dtype = build_model(cfg, tokenizer, env, mode)
    mask_id = model.config.mask_token_id
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen_bytes = next((p.element_size() for p in model.parameters() if not p.requires_grad), 4)
    print0(f"model: {n_params:,} parameters, {n_trainable:,} trainable, {n_params - n_trainable:,} frozen; "
           f"mode {mode}, precision {precision}, device {env.device}")
    print0(parallel.format_memory(parallel.estimate_memory(n_params, n_trainable, env.world_size, mode, frozen_bytes),
                                  mode, env.world_size))
    wrapped = wrap_model(model, cfg, env, mode, precision)
    optimizer = build_optimizer(wrapped, cfg.optim, env.device)
    scaler = torch.amp.GradScaler(env.device.type) if precision == "fp16" else None
    autocast = (torch.autocast(env.device.type, dtype=DTYPES[precision]) if precision != "fp32" and mode != "fsdp"
                else nullcontext())
    def model_flops(micro_batches: list[Batch]) -> float:  # this rank's training FLOPs, at each batch's length
        return sum(b.input_ids.numel() * training_flops_per_token(
            model.config, b.input_ids.shape[1], frozen_base=cfg.lora.enabled,
            lora_params=n_trainable if cfg.lora.enabled else 0) for b in micro_batches)

    peak_flops = cfg.log.peak_tflops * 1e12 or _device_peak_flops(env.device, precision)

    # --- resume --------------------------------------------------------------------------------------------------
    step, bad_in_row, skipped = 0, 0, 0
    if resume_path is not None:
        state = checkpoint.load_checkpoint(resume_path, model=wrapped, optimizer=optimizer, scaler=scaler,
                                           fsdp=mode == "fsdp", rank=env.rank)
        step, bad_in_row, skipped = state["step"], state["bad_in_row"], state["skipped_steps"]
        batches.load_state_dict(state["data"])
        print0(f"resumed from {resume_path} at step {step}")

    def save(at_step: int) -> Path:
        trainer_state = {
            "step": at_step, "data": batches.state_dict(), "bad_in_row": bad_in_row, "skipped_steps": skipped,
            "world_size": env.world_size, "config": config_to_dict(cfg), "versions": checkpoint.package_versions(),
        }
        return checkpoint.save_checkpoint(run_dir, at_step, model=wrapped, optimizer=optimizer, scaler=scaler,
                                          trainer_state=trainer_state, keep_last=cfg.checkpoint.keep_last,
                                          fsdp=mode == "fsdp", rank=env.rank)

    if env.is_main:  # only now: a relaunch that fails its checks leaves the run's config.json as it was
        (run_dir / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
    stop = checkpoint.StopSignal()
    stop.install()
    log = MetricsLog(run_dir, cfg.log.tensorboard, env.is_main)
    progress = _progress_bar(cfg.log.progress and env.is_main, step, total_steps)

    # --- the loop ------------------------------------------------------------------------------------------------
    wrapped.train()
    window = {"time": time.perf_counter(), "tokens": 0, "response": 0, "flops": 0.0}
    exit_code = 0
    while step < total_steps:
        lr = lr_at(step, total_steps, cfg.optim)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # Draw every micro-batch of the step and its noise first, so the loss denominator (sequences, response
        # tokens or masked tokens across all micro-batches and ranks) is known before the first backward.
        micro = [next(batches) for _ in range(accum)]
        noisy = [noise_micro_batch(b, step, m, env, cfg, mask_id, global_batch) for m, b in enumerate(micro)]
        local_count = sum(diffusion.normalizer_count(n, cfg.diffusion) for n in noisy)
        (denominator,) = parallel.all_reduce_sum([local_count], env.device)
        denominator = max(denominator, 1.0)

        loss_total = torch.zeros((), device=env.device, dtype=torch.float64)
        for m, batch in enumerate(noisy):
            last = m == accum - 1
            sync = _gradient_sync(wrapped, mode, last)
            with sync, autocast:
                loss_sum = diffusion.loss_sum(wrapped, _to_device(batch, env.device), cfg.diffusion)
                # DDP and FSDP average gradients over ranks; multiplying by world_size turns that into a sum.
                loss = loss_sum * (env.world_size / denominator)
            (scaler.scale(loss) if scaler else loss).backward()
            loss_total += loss_sum.detach().double()

        (step_loss,) = parallel.all_reduce_sum([loss_total.item()], env.device)
        step_loss /= denominator
        if scaler:
            scaler.unscale_(optimizer)
        grad_norm = _clip_grad_norm(wrapped, cfg.optim.max_grad_norm)
        if math.isfinite(step_loss) and (math.isfinite(grad_norm) or scaler is not None):
            (scaler.step(optimizer) if scaler else optimizer.step())
            bad_in_row = 0
        else:
            skipped += 1
            bad_in_row += 1
            print0(f"step {step}: non-finite loss {step_loss} or grad norm {grad_norm}; step skipped "
                   f"({bad_in_row} in a row, {skipped} in all)")
        if scaler:
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if bad_in_row >= cfg.train.max_bad_steps:
            print0(f"error: {bad_in_row} consecutive non-finite steps (train.max_bad_steps); stopping. "
                   f"The last good checkpoint is the newest in {run_dir}")
            exit_code = 3
            break

        # --- logging -------------------------------------------------------------------------------------------
        tokens = sum(b.input_ids.numel() for b in micro)
        response = sum(int(b.answer_lengths.sum()) for b in micro)
        tokens, response = parallel.all_reduce_sum([tokens, response], env.device) if env.distributed \
            else (tokens, response)
        window["tokens"] += tokens
        window["response"] += response
        window["flops"] += model_flops(micro)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
        if step % cfg.log.every == 0 or step == total_steps:
            elapsed = time.perf_counter() - window["time"]
            tok_s = window["tokens"] / elapsed
            record = {
                "step": step, "loss": step_loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tok_s,
                "response_tokens_per_s": window["response"] / elapsed, "epoch": batches.epoch,
                "peak_memory_gib": _peak_memory(env.device) / 2**30, "skipped_steps": skipped,
                "mfu": window["flops"] / elapsed / peak_flops if peak_flops else None,
            }
            log.write(record)
            line = (f"step {step}/{total_steps} | loss {step_loss:.4f} | lr {lr:.2e} | grad {grad_norm:.3f} | "
                    f"{tok_s:,.0f} tok/s | mem {record['peak_memory_gib']:.2f} GiB")
            if record["mfu"] is not None:
                line += f" | MFU {100 * record['mfu']:.1f}%"
            (progress.write if progress is not None else print0)(line)
            window = {"time": time.perf_counter(), "tokens": 0, "response": 0, "flops": 0.0}

        # --- checkpoint (before eval, so a failing eval never costs a checkpoint), eval, preemption ------------------
        stopping = stop.any_rank(env.device) or step == cfg.train.stop_at_step
        # A periodic save waits for a good step, so it never rotates out a good checkpoint for a skipped one.
        periodic = cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and bad_in_row == 0
        if stopping or step == total_steps or periodic:
            path = save(step)
            print0(f"saved {path}")
        if stopping:
            print0(f"{stop.name or 'train.stop_at_step'}: checkpoint saved at step {step}; exiting. "
                   f"Resume with checkpoint.resume=auto (the default).")
            break
        if eval_set is not None and cfg.train.eval_every and (step % cfg.train.eval_every == 0 or step == total_steps):
            # Eval must not move the training RNG: a run resumed from this step's checkpoint skips this eval.
            with torch.random.fork_rng(devices=[env.device] if env.device.type == "cuda" else []):
                evaluate(wrapped, model, eval_set, tokenizer, cfg, env, step, log, progress, pad_id)
    if progress is not None:
        progress.close()
    log.close()

    # --- export ------------------------------------------------------------------------------------------------
    if exit_code == 0 and step == total_steps and cfg.checkpoint.export:
        export(wrapped, model, cfg, env, run_dir, export_dtype, print0)
    parallel.close_distributed()
    return exit_code


# ---------------------------------------------------------------------------------------------------------------
# Pieces of the loop


def noise_micro_batch(batch: Any, step: int, micro_index: int, env: parallel.Dist, cfg: Config, mask_id: int,
                      global_batch: int) -> diffusion.NoisyBatch:
    """t and masks for one micro-batch, drawn per sample SLOT of the optimizer step's global batch.

    Slot s of step k always gets the same t and mask, seeded from (seed, step, s), however the global batch is cut
    into ranks and micro-batches: 4 micro-batches of 1 and 1 batch of 4, or 2 ranks and 1 rank, train on identical
    noise, and a resumed run redraws exactly what the uninterrupted one drew.
    """
    rows = batch.input_ids.shape[0]
    first_slot = (micro_index * env.world_size + env.rank) * rows
    # All ranks draw the whole step's t (shared generator) and take their slice: stratified levels then cover the
    # noise range across the global batch.
    t = diffusion.sample_times(rows, cfg.diffusion.time_sampling, diffusion.make_generator(cfg.train.seed, step),
                               global_size=global_batch, global_offset=first_slot,
                               shuffle=cfg.diffusion.stratified_shuffle)  # [rows]
    pieces = []
    for i in range(rows):
        row = Batch(*(getattr(batch, f.name)[i : i + 1] for f in dataclasses.fields(Batch)))
        generator = diffusion.make_generator(cfg.train.seed, step, first_slot + i)
        pieces.append(diffusion.noise_batch(row, t[i : i + 1], cfg=cfg.diffusion, mask_id=mask_id,
                                            generator=generator))
    return _concat_rows(pieces)


def _concat_rows(pieces: list[diffusion.NoisyBatch]) -> diffusion.NoisyBatch:
    masks = [p.attention_mask for p in pieces]
    if all(m is None for m in masks):
        attention_mask = None
    else:  # a row without padding has no mask of its own: attend everywhere
        attention_mask = torch.cat([torch.ones_like(p.noisy_ids) if m is None else m for p, m in zip(pieces, masks)])
    fields = [f.name for f in dataclasses.fields(diffusion.NoisyBatch) if f.name != "attention_mask"]
    return diffusion.NoisyBatch(**{n: torch.cat([getattr(p, n) for p in pieces]) for n in fields},
                                attention_mask=attention_mask)


def _to_device(noisy: diffusion.NoisyBatch, device: torch.device) -> diffusion.NoisyBatch:
    return dataclasses.replace(noisy, **{
        f.name: getattr(noisy, f.name).to(device, non_blocking=True)
        for f in dataclasses.fields(noisy) if isinstance(getattr(noisy, f.name), torch.Tensor)
    })


def _gradient_sync(model: torch.nn.Module, mode: str, last: bool) -> Any:
    """Synchronise gradients only on the last micro-step of an optimizer step."""
    if mode == "fsdp":
        model.set_requires_gradient_sync(last)
        return nullcontext()
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not last:
        return model.no_sync()
    return nullcontext()


def _clip_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    return float(norm)


# Dense bf16 tensor-core peaks from the vendors' datasheets (FLOP/s); used for MFU.
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "4090": 165e12}


def _device_peak_flops(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda":
        return None  # CPUs vary too much for a table; bench.py measures the CPU's matmul rate instead
    name = torch.cuda.get_device_name(device)
    for key, peak in GPU_PEAK_BF16.items():
        if key in name:
            return peak if precision != "fp32" else peak / 2  # tf32
    return None


def _peak_memory(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0  # Linux reports KiB


def _progress_bar(enabled: bool, start: int, total: int) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", dynamic_ncols=True, file=sys.stdout)


def evaluate(wrapped: torch.nn.Module, model: LLaDA, eval_set: Any, tokenizer: Any, cfg: Config,
             env: parallel.Dist, step: int, log: MetricsLog, progress: Any, pad_id: int) -> None:
    """Validation NELBO (identical for any rank count) and, optionally, generations for fixed prompts."""
    from data import encode_prompt, eval_batches

    batches = eval_batches(eval_set, cfg.train.micro_batch_size, rank=env.rank, world_size=env.world_size,
                           pad_to=cfg.data.pad_to, pad_multiple=cfg.data.pad_multiple,
                           max_length=cfg.data.max_length, pad_id=pad_id)
    batches = (Batch(*(getattr(b, f.name).to(env.device) for f in dataclasses.fields(Batch))) for b in batches)
    # Under FSDP every rank takes part in each forward; under DDP the plain module skips the gradient hooks.
    net = model if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) else wrapped
    nelbo, stderr = diffusion.validation_nelbo(net, batches, mask_id=model.config.mask_token_id,
                                               draws=cfg.diffusion.eval_draws, seed=cfg.diffusion.eval_seed,
                                               chunk_size=cfg.diffusion.loss_chunk_size)
    record: dict[str, Any] = {"step": step, "eval_nelbo": nelbo, "eval_nelbo_stderr": stderr}
    line = f"step {step} | eval NELBO {nelbo:.4f} ± {stderr:.4f} nats/token"
    if cfg.log.sample_prompts:
        eot = special_token_ids(tokenizer)["eot"]
        samples = []
        wrapped.eval()  # no LoRA dropout while sampling
        for prompt in cfg.log.sample_prompts:
            ids = torch.tensor([encode_prompt(tokenizer, [{"role": "user", "content": prompt}])], device=env.device)
            out = diffusion.generate(net, ids, steps=cfg.log.sample_steps, gen_length=cfg.log.sample_gen_length,
                                     block_length=cfg.log.sample_gen_length, mask_id=model.config.mask_token_id)
            answer = out[0, ids.shape[1]:].tolist()
            for stop_id in (eot, model.config.eos_token_id):
                answer = answer[: answer.index(stop_id)] if stop_id in answer else answer
            samples.append({"prompt": prompt, "output": tokenizer.decode(answer)})
        record["samples"] = samples
        line += "".join(f"\n  {s['prompt']!r} -> {s['output']!r}" for s in samples)
    wrapped.train()
    log.write(record)
    if env.is_main:
        (progress.write if progress is not None else print)(line)


def export(wrapped: torch.nn.Module, model: LLaDA, cfg: Config, env: parallel.Dist, run_dir: Path,
           dtype: torch.dtype, print0: Any) -> None:
    """The final model as a drop-in HF-layout checkpoint (run_dir/final); for LoRA also the PEFT adapter."""
    import lora as lora_lib

    full = parallel.gather_full_state_dict(wrapped)  # collective under FSDP: every rank calls it
    if not env.is_main:
        return
    if cfg.lora.enabled:
        adapter_dir = run_dir / "adapter"
        lora_lib.save_adapter_from_state_dict(full, adapter_dir, cfg.lora, cfg.model.path or cfg.model.size)
        print0(f"exported LoRA adapter to {adapter_dir}")
        full = lora_lib.merge_state_dict(
            {k: v for k, v in full.items() if "lora_" not in k},
            {k: v for k, v in full.items() if "lora_" in k}, cfg.lora)
    full = {k: v.to(dtype) for k, v in full.items()}
    model.save_pretrained(run_dir / "final", state_dict=full)
    print0(f"exported model to {run_dir / 'final'}")


if __name__ == "__main__":
    parallel.exit_process(main())
