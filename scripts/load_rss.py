"""Peak RSS while loading a randomly initialised LLaDA checkpoint (default: llada-1b shape, bf16).

    python scripts/load_rss.py                      # creates the checkpoint in a temp dir, then measures
    python scripts/load_rss.py --dir CKPT           # measure an existing checkpoint directory
    python scripts/load_rss.py --reader safe_open   # the same with safetensors' copying reader, to compare

The checkpoint is written shard by shard (random bf16 tensors made one at a time), so creating it costs
about one shard of RAM. The load runs in a fresh subprocess, so its peak RSS (ru_maxrss) covers nothing
but `import torch` and the load. Goal: peak minus the import-torch baseline within 1.3x the size on disk.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rss_now_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def create_checkpoint(out: Path, size: str, shard_bytes: int) -> None:
    import torch
    from model import INDEX_NAME, LLaDA, LLaDAConfig, write_safetensors

    cfg = LLaDAConfig.from_name(size)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LLaDA(cfg).state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    groups, size_now = [[]], 0
    for key, shape in shapes.items():  # plan shards first: file names carry the count
        nbytes = shape.numel() * 2
        if groups[-1] and size_now + nbytes > shard_bytes:
            groups, size_now = groups + [[]], 0
        groups[-1].append(key)
        size_now += nbytes
    g = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, keys in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: (torch.ones(shapes[k]) if "norm" in k else torch.randn(shapes[k], generator=g) * 0.02)
                   .bfloat16() for k in keys}
        write_safetensors(out / name, tensors)
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update({k: name for k in keys})
        del tensors
    (out / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps({**cfg.to_dict(), "torch_dtype": "bfloat16"}))


def measure(ckpt: Path, reader: str, dtype_name: str) -> dict:
    """Runs in the fresh subprocess."""
    import torch
    import model as model_py

    baseline_now, baseline_peak = rss_now_mb(), peak_rss_mb()
    if reader == "safe_open":  # the alternative: safetensors copies each tensor out of its own mmap
        from safetensors import safe_open

        def read_copying(path):
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}
        model_py.read_safetensors = read_copying
    t0 = time.time()
    m = model_py.LLaDA.from_pretrained(ckpt, dtype=getattr(torch, dtype_name))
    load_s = time.time() - t0
    after_load = peak_rss_mb()
    # A load that merely maps the file is cheap until the weights are used: read every weight (a forward
    # pass reads only one embedding row) and report the peak after that too.
    with torch.no_grad():
        m(torch.zeros(1, 8, dtype=torch.long))
        for p in m.parameters():
            p.sum()
    return {"baseline_rss_mb": baseline_now, "baseline_peak_mb": baseline_peak, "load_s": load_s,
            "peak_after_load_mb": after_load, "peak_after_reading_mb": peak_rss_mb(),
            "params": sum(p.numel() for p in m.parameters())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, help="existing checkpoint directory (default: create one)")
    ap.add_argument("--size", default="llada-1b", help="MODEL_SIZES entry for the created checkpoint")
    ap.add_argument("--shard-gb", type=float, default=1.0, help="shard size of the created checkpoint")
    ap.add_argument("--reader", choices=["mmap", "safe_open"], default="mmap")
    ap.add_argument("--dtype", default="bfloat16", help="dtype passed to from_pretrained")
    ap.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # subprocess modes
    ap.add_argument("--create", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.dir, args.reader, args.dtype)))
        return
    if args.create:
        create_checkpoint(args.dir, args.size, int(args.shard_gb * 2**30))
        return
    # Both steps run in their own processes and this one never imports torch: Linux carries ru_maxrss
    # across fork and exec, so a parent that had created the checkpoint would inflate the child's peak.
    with tempfile.TemporaryDirectory(prefix="llada_rss_") as tmp:
        ckpt = args.dir
        if ckpt is None:
            ckpt = Path(tmp) / "ckpt"
            t0 = time.time()
            subprocess.run([sys.executable, __file__, "--create", "--dir", str(ckpt), "--size", args.size,
                            "--shard-gb", str(args.shard_gb)], check=True)
            print(f"created {args.size} checkpoint in {time.time() - t0:.0f}s: {ckpt}")
        disk_mb = sum(f.stat().st_size for f in ckpt.glob("*.safetensors")) / 2**20
        cmd = [sys.executable, __file__, "--measure", "--dir", str(ckpt), "--reader", args.reader, "--dtype", args.dtype]
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    base = r["baseline_rss_mb"]
    if r["baseline_peak_mb"] > base + 50:
        print(f"warning: the measuring process started with a peak of {r['baseline_peak_mb']:,.0f} MiB (inherited)")
    print(f"params {r['params']:,}  on disk {disk_mb:,.0f} MiB  reader {args.reader}  dtype {args.dtype}  "
          f"load {r['load_s']:.1f}s")
    print(f"RSS after `import torch`: {base:,.0f} MiB")
    for label, peak in (("after from_pretrained", r["peak_after_load_mb"]),
                        ("after reading every weight", r["peak_after_reading_mb"])):
        print(f"peak RSS {label}: {peak:,.0f} MiB total, {peak - base:,.0f} MiB above baseline = "
              f"{(peak - base) / disk_mb:.2f}x the checkpoint on disk ({peak / disk_mb:.2f}x counting the baseline)")


if __name__ == "__main__":
    main()
