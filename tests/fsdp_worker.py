"""Run under torchrun by tests/test_fsdp.py: load an HF-layout checkpoint straight into FSDP2 shards (meta build,
per-rank slices of the mmap'd safetensors), compute logits with the sharded model, gather the full state dict.

    torchrun --nproc_per_node=2 tests/fsdp_worker.py CHECKPOINT_DIR OUT.pt
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import parallel  # noqa: E402
import train  # noqa: E402
from data import load_tokenizer  # noqa: E402


def main() -> None:
    checkpoint_dir, out_file = sys.argv[1], sys.argv[2]
    env = parallel.init_distributed()
    cfg = train.Config()
    cfg.model.path = cfg.model.tokenizer = checkpoint_dir
    cfg.parallel.mode = "fsdp"
    model, _ = train.build_model(cfg, load_tokenizer(checkpoint_dir), env, "fsdp")
    assert next(model.parameters()).device.type == "meta"  # no rank ever held the whole model
    wrapped = train.wrap_model(model, cfg, env, "fsdp", "fp32")
    local = sum(p.to_local().numel() for p in wrapped.parameters())
    total = sum(p.numel() for p in wrapped.parameters())
    input_ids = torch.arange(24).reshape(2, 12) % model.config.vocab_size
    with torch.no_grad():
        logits = wrapped(input_ids)
    full = parallel.gather_full_state_dict(wrapped)
    if env.is_main:
        torch.save({"logits": logits, "state": full, "local": local, "total": total}, out_file)
    parallel.close_distributed()


if __name__ == "__main__":
    main()
    parallel.exit_process(0)
