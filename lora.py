"""LoRA for LLaDA: inject, train, save in PEFT's format, load, merge.

A LoRA layer computes  y = x W^T + scaling * dropout(x) A^T B^T  with the base W frozen, A [r, in] random,
B [out, r] zero (so training starts exactly at the base model) and scaling = alpha / r.

Names. `LoRALinear` keeps the base weight as its own `weight` parameter, so `model.transformer.blocks.0.q_proj.weight`
is still the checkpoint key and base checkpoints load with no remapping. Its adapter tensors are
`<module path>.lora_A.weight` / `.lora_B.weight`; on disk they get PEFT's prefix `base_model.model.`, which is
exactly what `peft.PeftModel.from_pretrained` expects for the official LLaDA model class (same module paths).

Targets. A target without dots is a leaf name inside `model.transformer.blocks` only: LLaDA's MLP output and its
LM head are both called `ff_out`, and a LoRA on the 126k x 4096 head is rarely wanted. The head is targeted by its
full name, `model.transformer.ff_out`. PEFT matches a *list* of names by suffix (its "ff_out" would also hit the
head), so we write `target_modules` as a regex string, which PEFT full-matches against module names: PEFT then
wraps exactly the modules we trained. Adapters written by PEFT are loaded with PEFT's own matching rules.

    python lora.py merge BASE_DIR ADAPTER_DIR OUT_DIR [--dtype bf16|fp32]   # full checkpoint with LoRA folded in
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

BLOCK_LINEARS = ["q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"]
BLOCKS_PREFIX = "model.transformer.blocks."
PEFT_PREFIX = "base_model.model."  # PeftModel.base_model (LoraModel) .model (ours)
CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
_LORA_KEY = re.compile(r"\.lora_[AB]\.weight$")  # our in-model adapter keys
LLAMA_NAMES = {"o_proj": "attn_out", "gate_proj": "ff_proj", "down_proj": "ff_out"}


@dataclass
class LoRAConfig:
    enabled: bool = False  # train LoRA adapters on a frozen base instead of all weights
    r: int = 32  # rank of A [r, in] and B [out, r]
    # scaling = alpha / r = 8. With Adam every entry of B moves ~lr per step whatever the gradient's size, so the
    # step of the weight update scaling * B @ A grows linearly with scaling: scaling and lr are one knob. LoRA
    # at the usual alpha / r = 2 wants ~10x the full fine-tuning lr; 8 lets a LoRA run use a small multiple of
    # LLaDA's full-SFT lr (1e-5) and matches the reference tool (r 32, alpha 256), so results compare.
    # When changing r, keep alpha / r (not alpha) to keep the effective step.
    alpha: float = 256.0
    dropout: float = 0.05  # on the LoRA branch's input only; the frozen path never sees dropout
    # Leaf names of linears inside model.transformer.blocks (default: all seven), or full module names
    # ("model.transformer.ff_out" is the LM head; a bare "ff_out" is the MLP output in every block).
    targets: list[str] = field(default_factory=lambda: list(BLOCK_LINEARS))
    adapter: str = ""  # an adapter directory (ours or PEFT's) to start from; "" = fresh A random, B zero


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update. LoRA tensors stay fp32 even on a bf16 base."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.weight = base.weight  # same Parameter object: same key, same storage, no copy of the base
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        device = base.weight.device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        # PEFT's init: A kaiming-uniform as nn.Linear's default, B zero. Drawn on the CPU from a seeded
        # generator so that every rank and every device builds the same A.
        a = torch.empty(r, self.in_features, device="cpu")
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        with torch.no_grad():
            self.lora_A.weight.copy_(a)
            self.lora_B.weight.zero_()
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., in] -> [..., out]
        out = F.linear(x, self.weight, self.bias)
        if self.merged:
            return out
        # Cast the fp32 LoRA weights to the activation dtype: a bf16 base without autocast works, and under
        # autocast this is the cast autocast would do anyway. Gradients still reach the fp32 parameters.
        a, b = self.lora_A.weight.to(x.dtype), self.lora_B.weight.to(x.dtype)
        update = F.linear(F.linear(self.lora_dropout(x), a), b)  # [..., r] -> [..., out]
        return out + (update * self.scaling).to(out.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into `weight` (idempotent). Forward then costs what the base costs."""
        if not self.merged:
            self.weight.copy_(fold(self.weight, self.lora_A.weight, self.lora_B.weight, self.scaling))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge() (idempotent), up to rounding: ~1e-7 relative in fp32, but on a bf16 base every round trip
        rounds the weight, which is why merged_state_dict() computes merged tensors without touching the model."""
        if self.merged:
            self.weight.copy_(fold(self.weight, self.lora_A.weight, -self.lora_B.weight, self.scaling))
            self.merged = False

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}, merged={self.merged}"


def fold(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """weight + scaling * b @ a, computed in fp32 and returned in weight's dtype (a new tensor)."""
    delta = (b.float() @ a.float()) * scaling  # [out, r] @ [r, in] -> [out, in]
    return (weight.float() + delta.to(weight.device)).to(weight.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Injection


def _linear_names(model: nn.Module) -> list[str]:
    """Qualified names of the base linears (LoRA-wrapped ones included, their lora_A/lora_B excluded)."""
    names = []
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear) or (isinstance(m, nn.Linear) and not re.search(r"\.lora_[AB]$", name)):
            names.append(name)
    return names


def _in_blocks(name: str, leaf: str) -> bool:
    return re.fullmatch(re.escape(BLOCKS_PREFIX) + r"\d+\." + re.escape(leaf), name) is not None


def _describe(names: list[str]) -> str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names if n.startswith(BLOCKS_PREFIX)})
    others = [n for n in names if not n.startswith(BLOCKS_PREFIX)]
    return f"block linears: {', '.join(leaves) or '-'}; other linears (full names): {', '.join(others) or '-'}"


def match_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """Module names the targets select (our rule: bare leaf names inside the blocks, dotted names exactly)."""
    names = _linear_names(model)
    chosen = set()
    for t in targets:
        hits = [n for n in names if (n == t if "." in t else _in_blocks(n, t))]
        if not hits:
            hint = f" ('{t}' is a Llama name; LLaDA calls it '{LLAMA_NAMES[t]}')" if t in LLAMA_NAMES else ""
            raise ValueError(f"lora.targets: '{t}' matches no linear layer{hint}; {_describe(names)}")
        chosen.update(hits)
    return [n for n in names if n in chosen]  # model order


def _replace(model: nn.Module, names: list[str], r: int, alpha: float, dropout: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, leaf, LoRALinear(getattr(parent, leaf), r, alpha, dropout, generator=g))
    for pname, p in model.named_parameters():  # freeze by name: only adapter tensors train
        p.requires_grad_(bool(_LORA_KEY.search(pname)))


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def inject_lora(model: nn.Module, cfg: LoRAConfig, *, seed: int = 0) -> list[str]:
    """Wrap the targeted linears in LoRALinear (in place), freeze everything else; returns the wrapped names."""
    if lora_layers(model):
        raise ValueError("lora: the model already has LoRA layers (inject_lora called twice?)")
    if cfg.r < 1:
        raise ValueError(f"lora.r: must be >= 1, got {cfg.r}")
    if cfg.alpha <= 0:
        raise ValueError(f"lora.alpha: must be > 0, got {cfg.alpha}")
    if not 0 <= cfg.dropout < 1:
        raise ValueError(f"lora.dropout: must be in [0, 1), got {cfg.dropout}")
    if not cfg.targets:
        raise ValueError(f"lora.targets: empty; {_describe(_linear_names(model))}")
    names = match_targets(model, cfg.targets)
    _replace(model, names, cfg.r, float(cfg.alpha), cfg.dropout, seed)
    return names


def apply_lora(model: nn.Module, cfg: LoRAConfig, *, seed: int = 0) -> list[str]:
    """What the trainer calls: inject per cfg, then load cfg.adapter if set (which must agree with cfg, so that
    the adapters this run saves are described by cfg). Fails at startup, not at the first save."""
    names = inject_lora(model, cfg, seed=seed)
    if cfg.adapter:
        load_adapter(model, cfg.adapter)
    return names


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts; shared (tied) parameters count once."""
    params = {id(p): p for p in model.parameters()}.values()
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return trainable, sum(p.numel() for p in params) - trainable


def lora_summary(model: nn.Module) -> str:
    """One line for the trainer's log."""
    layers = lora_layers(model)
    trainable, frozen = count_parameters(model)
    m = next(iter(layers.values()), None)
    what = f"r={m.r} alpha={m.alpha:g} on {len(layers)} linears" if m else "no LoRA layers"
    return (f"LoRA {what}: trainable {trainable:,} ({100 * trainable / max(trainable + frozen, 1):.2f}%), "
            f"frozen {frozen:,}")


# ---------------------------------------------------------------------------------------------------------------
# PEFT format


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors under PEFT's on-disk keys: base_model.model.<module path>.lora_A.weight."""
    return {PEFT_PREFIX + k: v for k, v in model.state_dict().items() if _LORA_KEY.search(k)}


def lora_pairs(state_dict: dict[str, torch.Tensor], where: str, prefix_required: bool = False
               ) -> dict[str, dict[str, torch.Tensor]]:
    """{module name: {"lora_A": [r, in], "lora_B": [out, r]}} from the LoRA keys of a state dict, keyed as in
    our model (`<path>.lora_A.weight`), as PEFT writes (`base_model.model.` prefix) or as PEFT holds them in
    memory (`.lora_A.default.weight`). Other keys are ignored unless prefix_required (an adapter file)."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state_dict.items():
        m = re.fullmatch(r"(base_model\.model\.)?(.+)\.(lora_[AB])(?:\.default)?\.weight", key)
        if m is None or (prefix_required and not m.group(1)):
            if prefix_required:
                raise ValueError(f"{where}: unexpected key '{key}' (expected {PEFT_PREFIX}<module>.lora_A.weight)")
            continue
        pairs.setdefault(m.group(2), {})[m.group(3)] = t
    for name, ab in pairs.items():
        for which in ("lora_A", "lora_B"):
            if which not in ab:
                raise ValueError(f"{where}: missing key '{PEFT_PREFIX}{name}.{which}.weight'")
    return pairs


def targets_regex(adapted: list[str], blocks: set[str]) -> str:
    """A regex that PEFT full-matches against module names and that selects exactly `adapted`: a leaf adapted in
    every one of the model's `blocks` (indices) becomes one alternation, any other module is spelled out."""
    block_of = lambda n: n.split(".")[3]  # "model.transformer.blocks.3.q_proj" -> "3"
    leaves = [leaf for leaf in dict.fromkeys(n.rsplit(".", 1)[-1] for n in adapted if n.startswith(BLOCKS_PREFIX))
              if {block_of(n) for n in adapted if _in_blocks(n, leaf)} == blocks]
    parts = [re.escape(BLOCKS_PREFIX) + r"\d+\.(" + "|".join(leaves) + ")"] if leaves else []
    parts += [re.escape(n) for n in adapted if not any(_in_blocks(n, leaf) for leaf in leaves)]
    return "|".join(parts)


def peft_config(adapted: list[str], blocks: set[str], cfg: LoRAConfig, base_model_name_or_path: str) -> dict:
    alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha  # PEFT types lora_alpha as int
    return {  # the fields PEFT's LoraConfig writes that matter for a plain LoRA; PEFT fills in the rest
        "peft_type": "LORA", "task_type": None,  # None: PeftModel passes forward() through unchanged
        "base_model_name_or_path": base_model_name_or_path, "revision": None,
        "r": cfg.r, "lora_alpha": alpha, "lora_dropout": cfg.dropout,
        "target_modules": targets_regex(adapted, blocks), "exclude_modules": None,
        "bias": "none", "fan_in_fan_out": False, "modules_to_save": None, "init_lora_weights": True,
        "inference_mode": True, "use_rslora": False, "use_dora": False,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, cfg: LoRAConfig,
                 base_model_name_or_path: str) -> None:
    """Write adapter_config.json + adapter_model.safetensors (fp32) into out_dir, atomically (temp dir, rename)."""
    for name, m in lora_layers(model).items():
        if m.alpha != float(cfg.alpha):
            raise ValueError(f"lora.alpha: {cfg.alpha:g}, but layer {name} was built with alpha {m.alpha:g}")
    save_adapter_from_state_dict(model.state_dict(), out_dir, cfg, base_model_name_or_path)


def save_adapter_from_state_dict(state_dict: dict[str, torch.Tensor], out_dir: str | os.PathLike, cfg: LoRAConfig,
                                 base_model_name_or_path: str) -> None:
    """save_adapter() from a full state dict of the LoRA model (e.g. gathered from FSDP shards); base keys are
    only used to know the model's blocks."""
    out_dir = Path(out_dir)
    pairs = lora_pairs(state_dict, "state dict")
    if not pairs:
        raise ValueError("save_adapter: the state dict has no LoRA tensors")
    for name, ab in pairs.items():
        if ab["lora_A"].shape[0] != cfg.r:
            raise ValueError(f"lora.r: {cfg.r}, but '{name}.lora_A.weight' has shape {list(ab['lora_A'].shape)}")
    blocks = {m.group(1) for k in state_dict if (m := re.match(re.escape(BLOCKS_PREFIX) + r"(\d+)\.", k))}
    config = peft_config(list(pairs), blocks, cfg, base_model_name_or_path)
    tensors = {f"{PEFT_PREFIX}{name}.{which}.weight": t.detach().to("cpu", torch.float32).contiguous()
               for name, ab in pairs.items() for which, t in sorted(ab.items())}
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
    (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    if out_dir.exists():  # replace: move the old one aside first, so out_dir is never half-written
        old = out_dir.with_name(out_dir.name + f".old{os.getpid()}")
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old)
    else:
        tmp.rename(out_dir)


# Fields of a PEFT LoRA config that would change the maths or add tensors; we support none of them.
_UNSUPPORTED = ["use_dora", "use_rslora", "modules_to_save", "layers_to_transform", "rank_pattern", "alpha_pattern",
                "layer_replication", "lora_bias", "target_parameters", "fan_in_fan_out", "trainable_token_indices"]


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict:
    path = Path(adapter_dir) / CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"{path}: not found (an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    check_supported(config, str(path))
    if "target_modules" not in config:
        raise ValueError(f"{path}: missing 'target_modules'")
    return config


def check_supported(config: dict, where: str) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{where}: peft_type is {config.get('peft_type')!r}, only 'LORA' is supported")
    for key in _UNSUPPORTED:
        if config.get(key):
            raise ValueError(f"{where}: '{key}' = {config[key]!r} is not supported (plain LoRA only)")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{where}: 'bias' = {config['bias']!r} is not supported (only 'none')")
    for key in ("r", "lora_alpha"):
        if key not in config:
            raise ValueError(f"{where}: missing '{key}'")


def peft_targets(names: list[str], config: dict) -> list[str]:
    """The modules PEFT would wrap: a str target_modules is full-matched as a regex, a list matches a name
    exactly or as a dotted suffix; exclude_modules likewise."""
    def selected(spec: str | list[str] | None, name: str) -> bool:
        if not spec:
            return False
        if isinstance(spec, str):
            return re.fullmatch(spec, name) is not None
        return any(name == t or name.endswith("." + t) for t in spec)

    spec = config["target_modules"]
    if spec == "all-linear":  # PEFT: every linear except the output layer
        return [n for n in names if n.startswith(BLOCKS_PREFIX)]
    return [n for n in names if selected(spec, n) and not selected(config.get("exclude_modules"), n)]


def read_adapter_weights(adapter_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(adapter_dir) / WEIGHTS_NAME
    if not path.is_file():
        hint = " (adapter_model.bin is a pickle; convert it to safetensors)" if path.with_suffix(".bin").is_file() else ""
        raise ValueError(f"{path}: not found{hint}")
    return load_file(str(path))


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> None:
    """Load an adapter (ours or PEFT's). Injects LoRA with the adapter's r/alpha/targets if the model has none;
    otherwise the model's LoRA layers must be exactly the adapter's."""
    config = read_adapter_config(adapter_dir)
    where = str(Path(adapter_dir) / WEIGHTS_NAME)
    tensors = read_adapter_weights(adapter_dir)
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    wanted = peft_targets(_linear_names(model), config)
    if not wanted:
        raise ValueError(f"{Path(adapter_dir) / CONFIG_NAME}: target_modules {config['target_modules']!r} matches "
                         f"no linear layer of this model; {_describe(_linear_names(model))}")
    layers = lora_layers(model)
    if not layers:
        _replace(model, wanted, r, alpha, float(config.get("lora_dropout", 0.0)), seed=0)
        layers = lora_layers(model)
    elif sorted(layers) != sorted(wanted):
        extra, missing = sorted(set(layers) - set(wanted)), sorted(set(wanted) - set(layers))
        raise ValueError(f"{adapter_dir}: the adapter targets differ from lora.targets (only in the model: "
                         f"{extra[:3]}, only in the adapter: {missing[:3]}); set lora.targets to match")
    for name, m in layers.items():
        if (m.r, m.alpha) != (r, alpha):
            raise ValueError(f"{adapter_dir}: adapter has r={r} alpha={alpha:g}, the model's LoRA layers "
                             f"r={m.r} alpha={m.alpha:g}; set lora.r / lora.alpha to match")
        if m.merged:
            raise ValueError(f"lora: layer {name} is merged; unmerge() before loading an adapter")
    pairs = lora_pairs(tensors, where, prefix_required=True)
    for name in layers:
        if name not in pairs:
            raise ValueError(f"{where}: missing key '{PEFT_PREFIX}{name}.lora_A.weight'")
    for name, ab in pairs.items():
        if name not in layers:
            raise ValueError(f"{where}: unexpected key '{PEFT_PREFIX}{name}.lora_A.weight' (no LoRA layer '{name}' "
                             "in the model)")
        for which, t in ab.items():
            param = getattr(layers[name], which).weight
            if t.shape != param.shape:
                raise ValueError(f"{where}: key '{PEFT_PREFIX}{name}.{which}.weight' has shape {list(t.shape)}, "
                                 f"the model expects {list(param.shape)}")
            with torch.no_grad():
                param.copy_(t)  # keeps the parameter's fp32 dtype and device


# ---------------------------------------------------------------------------------------------------------------
# Merging


def merge_state_dict(base_sd: dict[str, torch.Tensor], adapter_sd: dict[str, torch.Tensor],
                     adapter_config: dict | LoRAConfig) -> dict[str, torch.Tensor]:
    """A new state dict: base_sd with every adapted weight replaced by weight + alpha/r * B @ A (fp32 maths,
    base dtype). adapter_sd is keyed as on disk or as in our model; adapter_config is the adapter_config.json
    dict or a LoRAConfig. Inputs are not modified; untouched tensors are shared, not copied."""
    if isinstance(adapter_config, LoRAConfig):
        r, alpha = adapter_config.r, float(adapter_config.alpha)
    else:
        check_supported(adapter_config, "adapter config")
        r, alpha = int(adapter_config["r"]), float(adapter_config["lora_alpha"])
    out = dict(base_sd)
    for name, ab in lora_pairs(adapter_sd, "adapter state dict").items():
        key = f"{name}.weight"
        if key not in base_sd:
            raise ValueError(f"adapter state dict: module '{name}' has no base weight '{key}'")
        a, b, w = ab["lora_A"], ab["lora_B"], base_sd[key]  # [r, in], [out, r], [out, in]
        if a.shape[0] != r or b.shape[1] != r or (b.shape[0], a.shape[1]) != tuple(w.shape):
            raise ValueError(f"adapter state dict: '{name}' lora_A {list(a.shape)} / lora_B {list(b.shape)} do "
                             f"not fit r={r} and base weight {list(w.shape)}")
        out[key] = fold(w, a, b, alpha / r)
    return out


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's keys with the LoRA updates folded in, for save_pretrained(state_dict=...).
    The model itself is not changed (layers already merged are taken as they are)."""
    sd = {k: v for k, v in model.state_dict().items() if not _LORA_KEY.search(k)}
    for name, m in lora_layers(model).items():
        if not m.merged:
            sd[f"{name}.weight"] = fold(m.weight.detach(), m.lora_A.weight, m.lora_B.weight, m.scaling)
    return sd


# ---------------------------------------------------------------------------------------------------------------
# CLI


def merge_command(base_dir: str, adapter_dir: str, out_dir: str, dtype: str | None = None) -> None:
    from model import LLaDA  # only the CLI needs the model class; the library works on any module tree

    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32, None: None}
    model = LLaDA.from_pretrained(base_dir, dtype=dtypes[dtype])
    load_adapter(model, adapter_dir)
    for m in lora_layers(model).values():
        m.merge()  # in place: no second copy of the 8B base in memory
    sd = {k: v for k, v in model.state_dict().items() if not _LORA_KEY.search(k)}
    model.save_pretrained(out_dir, state_dict=sd)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="LoRA tools for LLaDA")
    sub = parser.add_subparsers(dest="command", required=True)
    merge = sub.add_parser("merge", help="write a full checkpoint with the adapter folded into the base")
    merge.add_argument("base_dir")
    merge.add_argument("adapter_dir")
    merge.add_argument("out_dir")
    merge.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: the base's dtype")
    args = parser.parse_args(argv)
    try:
        merge_command(args.base_dir, args.adapter_dir, args.out_dir, args.dtype)
    except (ValueError, OSError) as e:
        print(f"lora.py: error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"merged {args.adapter_dir} into {args.base_dir} -> {args.out_dir}")


if __name__ == "__main__":
    main()
