"""Benchmark of the training step: tokens/s, step time, peak memory and MFU, and ours vs the naive loss.

    # The CPU acceptance run: LLaDA's real vocabulary, seq 1024, a small trunk, our loss vs full logits
    python bench.py --size tiny --vocab 126464 --d-model 256 --layers 2 --mlp 768 --seq-len 1024 --compare
    # Real data: tokens/s over real tokens, pad_to="longest" + length grouping vs padding to max_length
    python bench.py --size tiny --mixed-demo --tokenizer demo/tokenizer --max-length 1024 --batch 4
    # GPU (see scripts/gpu_bench.sh): 8B-shaped LoRA at 4096 tokens
    python bench.py --size llada-8b --seq-len 4096 --precision bf16 --lora --grad-ckpt --device cuda

One measurement = one fresh subprocess of this script (`--path ours|naive`), which builds the model at random
init, draws every batch and mask up front from fixed seeds (so both paths see identical masks), runs
`--warmup` then `--steps` full optimizer steps (forward + loss, backward, AdamW step, zero_grad) and prints
its figures as one JSON line. Fresh processes make the CPU's peak RSS a per-path number and keep one path's
cached allocations out of the other's. Memory figures, both measured over the timed steps only:
  peak_mem_gb  CUDA: torch.cuda.max_memory_allocated (weights, optimizer state, activations...);
               CPU: the process's peak RSS (the same, plus the torch runtime itself)
  step_mem_gb  peak_mem minus the memory held when the timed steps start (weights and optimizer state):
               what one training step adds (activations, logits, gradients).
MFU = model.training_flops_per_token (LoRA: frozen base counted without weight gradients; the LM head at every
position; recomputation not counted) x tokens/s / peak. Peak: a datasheet table for GPUs (dense bf16,
fp32 = TF32 at half of it) or --peak-tflops; on CPU the measured rate of 2048x2048 matmuls in the precision.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from diffusion import DiffusionConfig, loss_sum, make_generator, naive_loss_sum, noise_batch, normalizer_count, sample_times
from model import LLaDA, LLaDAConfig, MODEL_SIZES, training_flops_per_token
from train import GPU_PEAK_BF16

GB = 2**30


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny", choices=sorted(MODEL_SIZES), help="named model size (model.MODEL_SIZES)")
    p.add_argument("--vocab", type=int, help="vocab_size = embedding_size override (LLaDA: 126464)")
    p.add_argument("--layers", type=int, help="n_layers override")
    p.add_argument("--d-model", type=int, help="d_model override")
    p.add_argument("--heads", type=int, help="n_heads override (also n_kv_heads unless --kv-heads)")
    p.add_argument("--kv-heads", type=int, help="n_kv_heads override")
    p.add_argument("--mlp", type=int, help="mlp_hidden_size override")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1, help="sequences per step")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="bf16 = autocast with fp32 trainable weights; with --lora the frozen base is stored in bf16")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocator, caches, compile)")
    p.add_argument("--lora", action="store_true", help="LoRA on all block linears, frozen base")
    p.add_argument("--lora-r", type=int, default=32)
    p.add_argument("--grad-ckpt", action="store_true", help="per-block activation checkpointing")
    p.add_argument("--compile", action="store_true", help="torch.compile each block")
    p.add_argument("--chunk-size", type=int, default=DiffusionConfig().loss_chunk_size, help="diffusion.loss_chunk_size (masked rows per head chunk)")
    p.add_argument("--compare", action="store_true", help="also run the naive full-logits loss; print the ratios")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: table or measured)")
    p.add_argument("--rounds", type=int, default=1, help="repeat the measurements, alternating paths; keep each "
                   "path's fastest round (use on a machine shared with other work)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", help="JSONL/JSON file: real-data throughput, pad_to longest+grouping vs max_length")
    p.add_argument("--mixed-demo", action="store_true", help="--data = a generated sort/reverse file, short and long mixed")
    p.add_argument("--tokenizer", default="demo/tokenizer", help="tokenizer directory for --data")
    p.add_argument("--max-length", type=int, default=1024, help="--data: data.max_length (and the padded length)")
    p.add_argument("--path", choices=["ours", "naive"], help=argparse.SUPPRESS)  # internal: one measurement
    p.add_argument("--pad-to", choices=["longest", "max_length"], help=argparse.SUPPRESS)  # internal, with --data
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch < 1 or args.seq_len < 4 or args.rounds < 1:
        p.error("need --steps >= 1, --warmup >= 0, --batch >= 1, --seq-len >= 4, --rounds >= 1")
    return args


# ------------------------------------------------------------------------------------------------
# Model and batches


def build_config(args: argparse.Namespace, **extra: int) -> LLaDAConfig:
    names = {"vocab": "vocab_size", "layers": "n_layers", "d_model": "d_model", "heads": "n_heads",
             "kv_heads": "n_kv_heads", "mlp": "mlp_hidden_size"}
    overrides = {key: getattr(args, arg) for arg, key in names.items() if getattr(args, arg) is not None}
    if args.heads is not None and args.kv_heads is None:
        overrides["n_kv_heads"] = args.heads
    overrides.update(extra)
    seq = args.max_length if args.data else args.seq_len
    overrides["max_sequence_length"] = max(seq, MODEL_SIZES[args.size].get("max_sequence_length", 4096))
    cfg = LLaDAConfig.from_name(args.size, **overrides)
    if cfg.mask_token_id >= cfg.embedding_size:  # a shrunk vocabulary: use its last two ids as mask and EOS
        cfg.mask_token_id, cfg.eos_token_id, cfg.pad_token_id = cfg.vocab_size - 1, cfg.vocab_size - 2, cfg.vocab_size - 2
    return cfg


def random_model(cfg: LLaDAConfig, dtype: torch.dtype, device: torch.device, seed: int) -> LLaDA:
    """model.init_weights' scheme, drawn on the target device in the target dtype: an 8B model initialises on
    the GPU in seconds, where init_weights (CPU fp32 draws, for device-independent values) takes minutes."""
    with torch.device("meta"):
        model = LLaDA(cfg).to(dtype)
    model.to_empty(device=device)
    model.tie_weights()
    g = torch.Generator(device=device).manual_seed(seed)
    small = 0.02 / (2 * cfg.n_layers) ** 0.5  # projections writing into the residual stream
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
                p.fill_(1.0)
            elif name.endswith("attn_out.weight") or (".blocks." in name and name.endswith("ff_out.weight")):
                p.normal_(0.0, small, generator=g)
            else:
                p.normal_(0.0, 0.02, generator=g)
    return model


def synthetic_batches(cfg: LLaDAConfig, args: argparse.Namespace, n: int) -> list:
    """n data.Batch of random tokens: prompt = the first seq/4 positions, answer to the end (no padding)."""
    from data import Batch

    B, L, P = args.batch, args.seq_len, args.seq_len // 4
    g = torch.Generator().manual_seed(args.seed)
    special = {cfg.mask_token_id, cfg.eos_token_id}
    top = min(cfg.vocab_size, min(special))  # draw below the special ids, so no token is one by accident
    out = []
    for i in range(n):
        ids = torch.randint(0, top, (B, L), generator=g)  # [B, L]
        out.append(Batch(input_ids=ids, prompt_lengths=torch.full((B,), P), answer_lengths=torch.full((B,), L - P),
                         indices=torch.arange(i * B, (i + 1) * B)))
    return out


def data_batches(args: argparse.Namespace, n: int) -> tuple[list, dict]:
    """n batches of the --data file through data.py (pad_to = args.pad_to) and the token ids for the config."""
    from data import BatchIterator, DataConfig, build_datasets, load_tokenizer, special_token_ids

    tok = load_tokenizer(args.tokenizer)
    ids = special_token_ids(tok)
    grouping = args.pad_to == "longest"
    cfg = DataConfig(train_files=[args.data], eval_fraction=0.0, max_length=args.max_length, pad_to=args.pad_to,
                     length_grouping=grouping, cache_dir="", seed=args.seed)
    train, _ = build_datasets(cfg, tok, log=lambda s: print(s, file=sys.stderr))
    it = BatchIterator.from_config(train, cfg, args.batch, pad_id=ids["pad"])
    tokens = {"vocab_size": len(tok), "embedding_size": len(tok), "mask_token_id": ids["mask"],
              "eos_token_id": ids["eos"], "pad_token_id": ids["pad"]}
    return [next(it) for _ in range(n)], tokens


def write_mixed_demo(path: str, n: int = 2000, seed: int = 0) -> None:
    """The demo's sort/reverse task with mixed lengths: 3/4 short (5-20 digits, ~70 tokens with the demo's
    character tokenizer), 1/4 long (100-240 digits, up to ~1000 tokens)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            k = rng.randint(5, 20) if rng.random() < 0.75 else rng.randint(100, 240)
            digits = [rng.randrange(10) for _ in range(k)]
            task = rng.choice(["sort", "reverse"])
            answer = sorted(digits) if task == "sort" else digits[::-1]
            f.write(json.dumps({"prompt": f"{task}: {' '.join(map(str, digits))}",
                                "response": " ".join(map(str, answer))}) + "\n")


# ------------------------------------------------------------------------------------------------
# Device peak and memory


def cpu_matmul_tflops(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    """Best-of-reps rate of an n x n x n matmul: what this CPU's BLAS delivers in this precision."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b  # warm-up: thread pool, packing buffers
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def gpu_peak_tflops(precision: str) -> float | None:
    name = torch.cuda.get_device_name()
    for key, peak in GPU_PEAK_BF16.items():  # the trainer's datasheet table, FLOP/s
        if key in name:
            peak /= 1e12
            return peak if precision == "bf16" else peak / 2  # fp32 runs as TF32 here: half the bf16 rate
    return None


def _proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status: no {field}")


class MemoryMeter:
    """Peak memory over a region. CUDA: the allocator's counters. CPU: the kernel's RSS high-water mark
    (VmHWM), reset to the current RSS at start() by writing 5 to /proc/self/clear_refs (Linux >= 4.0)."""

    def __init__(self, device: torch.device):
        self.device, self.exact = device, True

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:  # no reset: the peak then covers the whole process (warm-up included)
            self.exact = False
        self.base = _proc_status_kb("VmRSS") * 1024

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated()
        if self.exact:
            return _proc_status_kb("VmHWM") * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ------------------------------------------------------------------------------------------------
# One measurement (runs in a child process)


def run_path(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda" and args.precision == "fp32":
        torch.backends.cuda.matmul.allow_tf32 = True  # what anyone training in fp32 on a GPU would use
    torch.manual_seed(args.seed)  # LoRA dropout draws: the same in every child
    n = args.warmup + args.steps
    if args.data:
        batches, tokens = data_batches(args, n)
        cfg = build_config(args, **tokens)
    else:
        cfg = build_config(args)
        batches = synthetic_batches(cfg, args, n)
    dcfg = DiffusionConfig(loss_chunk_size=args.chunk_size)
    noisy = []
    for i, b in enumerate(batches):  # every mask drawn up front from (seed, step): identical across paths
        t = sample_times(b.input_ids.shape[0], dcfg.time_sampling, make_generator(args.seed, i))
        nb = noise_batch(b, t, cfg=dcfg, mask_id=cfg.mask_token_id, generator=make_generator(args.seed, i, 1))
        for name in ("noisy_ids", "targets", "masked", "p", "response", "attention_mask"):
            value = getattr(nb, name)
            setattr(nb, name, None if value is None else value.to(device))
        noisy.append(nb)

    bf16 = args.precision == "bf16"
    base_dtype = torch.bfloat16 if bf16 and args.lora else torch.float32  # trainable weights stay fp32 (master)
    t0 = time.perf_counter()
    model = random_model(cfg, base_dtype, device, args.seed)
    lora_params = 0
    if args.lora:
        from lora import LoRAConfig, inject_lora

        inject_lora(model, LoRAConfig(enabled=True, r=args.lora_r, alpha=8.0 * args.lora_r), seed=args.seed)
        lora_params = sum(p.numel() for n_, p in model.named_parameters() if "lora_" in n_)
    model.gradient_checkpointing = args.grad_ckpt
    if args.compile:
        for block in model.model.transformer.blocks:
            block.compile()
    model.train()
    init_s = time.perf_counter() - t0
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-5, weight_decay=0.1, fused=device.type == "cuda")
    loss_fn = loss_sum if args.path == "ours" else naive_loss_sum
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    meter, times, losses, real, padded, masked = MemoryMeter(device), [], [], 0, 0, 0
    for i, nb in enumerate(noisy):
        if i == args.warmup:
            meter.start()
        sync()
        t_start = time.perf_counter()
        with autocast:
            loss = loss_fn(model, nb, dcfg) / normalizer_count(nb, dcfg)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        dt = time.perf_counter() - t_start
        losses.append(loss.item())
        print(f"[{args.path}{'/' + args.pad_to if args.pad_to else ''}] step {i + 1}/{n} {dt:.3f}s "
              f"loss {losses[-1]:.4f}{' (warm-up)' if i < args.warmup else ''}", file=sys.stderr, flush=True)
        if i >= args.warmup:
            times.append(dt)
            b = batches[i]
            real += int((b.prompt_lengths + b.answer_lengths).sum()) if args.data else b.input_ids.numel()
            padded += b.input_ids.numel()
            masked += int(nb.masked.sum())
    peak = meter.peak()

    median = statistics.median(times)
    # Synthetic batches are all the same size: tokens per median step. Real data varies: totals over totals.
    tokens_per_s = real / sum(times) if args.data else args.batch * args.seq_len / median
    seq = padded / (len(times) * args.batch)  # mean padded length (the attention term of the FLOPs)
    model_flops = training_flops_per_token(cfg, int(seq), frozen_base=args.lora, lora_params=lora_params)
    # model_flops counts the LM head at every position, as for an autoregressive LM. The diffusion loss needs
    # logits only at masked positions, so `mfu` counts the head there only (useful work); `mfu_model_flops`
    # keeps the head everywhere (inflated for our path when the head dominates, e.g. a small trunk + 126k vocab).
    head = (4 if args.lora else 6) * cfg.embedding_size * cfg.d_model
    flops = model_flops - head * (1 - masked / real)
    peak_tflops = args.peak_tflops or (gpu_peak_tflops(args.precision) if device.type == "cuda" else None)
    mfu = flops * tokens_per_s / (peak_tflops * 1e12) if peak_tflops else None
    mfu_model = model_flops * tokens_per_s / (peak_tflops * 1e12) if peak_tflops else None
    return {
        "path": args.path, "pad_to": args.pad_to, "device": str(device), "precision": args.precision,
        "params": sum(p.numel() for p in model.parameters()), "trainable": sum(p.numel() for p in trainable),
        "lora_params": lora_params, "config": {k: v for k, v in cfg.to_dict().items() if k in _CONFIG_KEYS},
        "seq_len": args.seq_len if not args.data else None, "mean_padded_len": seq, "batch": args.batch,
        "init_s": init_s, "step_times": times, "median_step_s": median, "tokens_per_s": tokens_per_s,
        "real_token_fraction": real / padded, "peak_mem_gb": peak / GB, "step_mem_gb": (peak - meter.base) / GB,
        "mem_exact": meter.exact, "flops_per_token": flops, "model_flops_per_token": model_flops,
        "masked_fraction": masked / real, "peak_tflops": peak_tflops, "mfu": mfu, "mfu_model_flops": mfu_model,
        "losses": losses, "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "reserved_gb": torch.cuda.max_memory_reserved() / GB if device.type == "cuda" else None,
    }


_CONFIG_KEYS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size", "vocab_size")


# ------------------------------------------------------------------------------------------------
# Orchestration: one child per path, then the report


def spawn(argv: list[str], extra: list[str]) -> dict:
    """Run this script in a fresh process for one measurement and return its JSON line."""
    cmd = [sys.executable, os.path.abspath(__file__), *argv, *extra]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # stderr (progress) passes through
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            return json.loads(line[len("BENCH_JSON "):])
    raise RuntimeError(f"bench child {' '.join(extra)} failed with exit code {proc.returncode}")


def describe(r: dict) -> str:
    c = r["config"]
    what = (f"params {r['params'] / 1e6:.1f}M (trainable {r['trainable'] / 1e6:.2f}M), d_model {c['d_model']}, "
            f"{c['n_layers']} layers, {c['n_heads']}/{c['n_kv_heads']} heads, mlp {c['mlp_hidden_size']}, "
            f"vocab {c['vocab_size']}")
    peak = f"{r['peak_tflops']:.3g} TFLOP/s" if r["peak_tflops"] else "unknown (pass --peak-tflops)"
    return f"model: {what}\nbatch {r['batch']}, precision {r['precision']}, device {r['gpu'] or r['device']}, peak {peak}"


def row(name: str, r: dict) -> str:
    mfu = f"{100 * r['mfu']:5.1f}%" if r["mfu"] is not None else "   n/a"
    return (f"{name:<12} {r['median_step_s']:>9.3f} {r['tokens_per_s']:>11.0f} {r['peak_mem_gb']:>10.3f} "
            f"{r['step_mem_gb']:>10.3f} {mfu:>7} {r['losses'][0]:>10.5f}")


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.path:  # child: one measurement
        result = run_path(args)
        print("BENCH_JSON " + json.dumps(result), flush=True)
        return result

    peak = args.peak_tflops
    if peak is None and args.device == "cpu":
        dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
        peak = cpu_matmul_tflops(dtype)
        print(f"CPU peak: {peak:.3f} TFLOP/s measured ({args.precision} 2048x2048 matmul, "
              f"{torch.get_num_threads()} threads)")
    extra = ["--peak-tflops", str(peak)] if peak else []
    tmp = None
    if args.mixed_demo:
        tmp = tempfile.TemporaryDirectory()
        args.data = os.path.join(tmp.name, "mixed.jsonl")
        write_mixed_demo(args.data)
        extra += ["--data", args.data]
    try:
        if args.data:
            variants = {p: ["--path", "ours", "--pad-to", p] for p in ("longest", "max_length")}
        else:
            variants = {p: ["--path", p] for p in (("ours", "naive") if args.compare else ("ours",))}
        # Rounds alternate the variants (ours, naive, ours, naive, ...) and each keeps its fastest round (same
        # batches every round), so a burst of load from other processes cannot land on one variant only.
        rounds: dict[str, list[dict]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, flags in variants.items():
                rounds[name].append(spawn(argv, extra + flags))
        runs = {name: max(rs, key=lambda r: r["tokens_per_s"]) for name, rs in rounds.items()}
        for name, r in runs.items():
            r["round_medians"] = [x["median_step_s"] for x in rounds[name]]
    finally:
        if tmp is not None:
            tmp.cleanup()

    first = next(iter(runs.values()))
    print(describe(first))
    result: dict = {"runs": runs}
    if args.data:
        source = "a generated mixed-length demo file" if args.mixed_demo else args.data
        print(f"data {source}, max_length {args.max_length}, {args.steps} timed steps (+{args.warmup} warm-up)")
        for name, r in runs.items():
            print(f"pad_to={name:<10} real tokens/s {r['tokens_per_s']:9.0f}  real-token fraction "
                  f"{r['real_token_fraction']:.2f}  mean padded length {r['mean_padded_len']:.0f}  "
                  f"median step {r['median_step_s']:.3f}s")
        result["real_tokens_per_s_ratio"] = runs["longest"]["tokens_per_s"] / runs["max_length"]["tokens_per_s"]
        print(f"longest+grouping vs max_length: {result['real_tokens_per_s_ratio']:.2f}x real tokens/s")
    else:
        print(f"seq {args.seq_len}, {args.steps} timed steps (+{args.warmup} warm-up), median step time")
        print(f"{'path':<12} {'step_s':>9} {'tokens/s':>11} {'peak_GB':>10} {'step_GB':>10} {'MFU':>7} {'loss[0]':>10}")
        for name, r in runs.items():
            print(row(name, r))
        if args.compare:
            ours, naive = runs["ours"], runs["naive"]
            result.update(speedup=naive["median_step_s"] / ours["median_step_s"],
                          peak_mem_ratio=ours["peak_mem_gb"] / naive["peak_mem_gb"],
                          step_mem_ratio=ours["step_mem_gb"] / max(naive["step_mem_gb"], 1e-9))
            print(f"ours vs naive: {result['speedup']:.2f}x faster, peak memory {result['peak_mem_ratio']:.2f}x, "
                  f"step memory {result['step_mem_ratio']:.2f}x of naive")
    print("JSON " + json.dumps({k: v for k, v in result.items() if k != "runs"} |
                               {name: {k: r[k] for k in _SUMMARY} for name, r in runs.items()}))
    return result


_SUMMARY = ("median_step_s", "tokens_per_s", "peak_mem_gb", "step_mem_gb", "mfu", "mfu_model_flops", "masked_fraction",
            "params", "trainable", "batch", "seq_len", "precision", "device", "gpu", "reserved_gb", "losses",
            "round_medians")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, RuntimeError, OSError) as e:
        print(f"bench.py: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(1)
