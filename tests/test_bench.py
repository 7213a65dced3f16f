"""bench.py end to end on a tiny model: both paths run, report positive figures and agree on the loss."""
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import bench  # noqa: E402


def test_compare_tiny_cpu(capsys, monkeypatch):
    # One thread in the children: on a loaded 2-core machine OpenMP threads waiting for each other make
    # tiny matmuls 10x slower; the figures here only need to exist.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # --peak-tflops skips the CPU matmul measurement; the two paths run in child processes as in real use.
    result = bench.main(["--size", "tiny", "--seq-len", "32", "--batch", "2", "--steps", "1", "--warmup", "1",
                         "--compare", "--peak-tflops", "0.1", "--chunk-size", "8"])
    out = capsys.readouterr().out
    printed = json.loads(next(line for line in out.splitlines() if line.startswith("JSON "))[len("JSON "):])
    for key in ("speedup", "peak_mem_ratio", "step_mem_ratio"):
        assert printed[key] > 0 and math.isfinite(printed[key]), key
    for path in ("ours", "naive"):
        r = printed[path]
        for key in ("median_step_s", "tokens_per_s", "peak_mem_gb", "mfu", "params", "trainable"):
            assert r[key] > 0, (path, key)
        assert r["step_mem_gb"] >= 0 and r["batch"] == 2 and r["seq_len"] == 32 and len(r["losses"]) == 2
        assert "tokens/s" in out and "ours vs naive" in out
    # Same model, same masks: the chunked fused loss equals the full-logits loss (several chunks here).
    ours, naive = result["runs"]["ours"]["losses"], result["runs"]["naive"]["losses"]
    assert math.isclose(ours[0], naive[0], rel_tol=1e-5), (ours[0], naive[0])
