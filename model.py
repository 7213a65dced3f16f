"""LLaDA: a Llama-style transformer with bidirectional attention (a masked diffusion LM).

The module tree is named so that `state_dict()` keys ARE the keys of the released checkpoints
(GSAI-ML/LLaDA-8B-Instruct): no remapping table. Checkpoints load by building the model on the meta
device and assigning mmap-backed tensors, so an 8B model loads with about one copy of its weights
in RAM. Layout of this file: config and named sizes, modules (top-down), loading and saving, FLOPs.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


class CheckpointError(ValueError):
    """A checkpoint directory or config that cannot be loaded; one line naming the file and key."""


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------

@dataclass
class LLaDAConfig:
    d_model: int                      # hidden size
    n_layers: int                     # transformer blocks
    n_heads: int                      # query heads
    n_kv_heads: int                   # key/value heads (< n_heads: grouped-query attention)
    mlp_hidden_size: int              # SwiGLU inner size
    vocab_size: int                   # tokenizer vocabulary
    embedding_size: int               # rows of wte and of the LM head (vocab padded up)
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    max_sequence_length: int = 4096
    mask_token_id: int = 126336       # the [MASK] token the diffusion process writes
    eos_token_id: int = 126081
    pad_token_id: int = 126081
    weight_tying: bool = False        # True: the LM head reuses wte (LLaDA-8B: False)
    include_bias: bool = False        # biases are not supported (no LLaDA release has them)
    extra: dict = field(default_factory=dict)  # every other config.json field, written back unchanged

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> LLaDAConfig:
        d = dict(d)
        # OLMo-format configs write null for "same as n_heads" / "same as vocab_size".
        if d.get("n_kv_heads") is None and "n_heads" in d:
            d["n_kv_heads"] = d["n_heads"]
        if d.get("embedding_size") is None and "vocab_size" in d:
            d["embedding_size"] = d["vocab_size"]
        known = {f.name: f for f in fields(cls) if f.name != "extra"}
        for name, f in known.items():
            if f.default is MISSING and f.default_factory is MISSING and name not in d:
                raise CheckpointError(f"{source}: missing required field '{name}'")
            if name in d and not isinstance(d[name], (int, float, bool)):
                raise CheckpointError(f"{source}: field '{name}' must be a number, got {d[name]!r}")
        # Architecture switches that LLaDA's config.json carries; refuse values this file does not implement
        # rather than load weights into the wrong computation.
        for key, ok in (("block_type", "llama"), ("activation_type", "silu"), ("layer_norm_type", "rms"),
                        ("rope", True), ("alibi", False), ("include_bias", False)):
            if key in d and d[key] != ok:
                raise CheckpointError(f"{source}: field '{key}' = {d[key]!r} is not supported (expected {ok!r})")
        if d["d_model"] % d["n_heads"] or d["n_heads"] % d["n_kv_heads"]:
            raise CheckpointError(f"{source}: field 'n_heads' must divide d_model and be a multiple of n_kv_heads")
        cfg = cls(**{k: v for k, v in d.items() if k in known})
        cfg.extra = {k: v for k, v in d.items() if k not in known}
        return cfg

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> LLaDAConfig:
        try:
            d = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path}: file not found (a checkpoint needs config.json)") from None
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        return cls.from_dict(d, source=str(path))

    def to_dict(self) -> dict:
        d = asdict(self)
        extra = d.pop("extra")
        return {**extra, **d}  # known fields win over stale copies in extra

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> LLaDAConfig:
        if name not in MODEL_SIZES:
            raise ValueError(f"model size '{name}' unknown; choose from {sorted(MODEL_SIZES)}")
        d = {**MODEL_SIZES[name], **overrides}
        if "vocab_size" in overrides and "embedding_size" not in overrides:
            d["embedding_size"] = overrides["vocab_size"]
        return cls.from_dict(d, source=f"MODEL_SIZES['{name}']")

    def num_params(self) -> int:
        d, kv, mlp = self.d_model, self.kv_dim, self.mlp_hidden_size
        block = 2 * d * d + 2 * kv * d + 3 * mlp * d + 2 * d  # q, attn_out; k, v; SwiGLU; two norms
        head = 0 if self.weight_tying else self.embedding_size * d
        return self.embedding_size * d + self.n_layers * block + d + head


MODEL_SIZES: dict[str, dict] = {
    # CPU demo and tests: ~0.8M parameters before embeddings; callers set vocab_size to their tokenizer.
    # RoPE base 100, not LLaDA's 500000 (made for 4096 tokens): over the demo's ~60-token canvases most of the
    # slow 500000-base frequencies barely turn, and exact relative positions are what reversing a list needs
    # (demo config at lr 1e-3, one run each: base 500000 51.5% exact match, 10000 93%, 1000 99.5%, 100 98.5%).
    "tiny": dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, mlp_hidden_size=384,
                 vocab_size=512, embedding_size=512, max_sequence_length=1024, rope_theta=100.0),
    # The LLaDA paper's 1B shape (GQA, 32 heads of 64): 1,487,243,264 parameters, 0.97B outside embeddings.
    "llada-1b": dict(d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4, mlp_hidden_size=5634,
                     vocab_size=126464, embedding_size=126464),
    # GSAI-ML/LLaDA-8B-Base / -Instruct: 8,015,581,184 parameters.
    "llada-8b": dict(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, mlp_hidden_size=12288,
                     vocab_size=126464, embedding_size=126464),
}


# ------------------------------------------------------------------------------------------------
# Modules
# ------------------------------------------------------------------------------------------------

class LLaDA(nn.Module):
    """Outer wrapper so that parameter names start with `model.transformer.` as in the checkpoints."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        if config.include_bias:
            raise CheckpointError("config.json: field 'include_bias' = true is not supported")
        self.config = config
        self.model = nn.Module()
        self.model.transformer = Transformer(config)
        self.gradient_checkpointing = False
        self.source_dir: str | None = None
        self.tie_weights()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                head: Callable[[torch.Tensor, nn.Module], Any] | None = None) -> Any:
        """input_ids [B, L]; attention_mask [B, L] with 1 = real token (None: attend everywhere).

        head None: logits [B, L, V]. Otherwise returns head(h, lm_head) with h = ln_f(x) [B, L, d], so the
        caller applies the 126k-row LM head only where it needs logits. It runs inside forward because
        under FSDP2 the head weight is only unsharded during the root module's forward.
        """
        t = self.model.transformer
        h = t(input_ids, attention_mask, self.gradient_checkpointing and self.training)  # [B, L, d]
        return t.ff_out(h) if head is None else head(h, t.ff_out)

    def tie_weights(self) -> None:
        if self.config.weight_tying:
            self.model.transformer.ff_out.weight = self.model.transformer.wte.weight

    def init_weights(self, seed: int = 0) -> None:
        """Init scheme: every matrix ~ N(0, 0.02); the projections that write into the residual stream
        (attn_out and each block's ff_out) get std 0.02 / sqrt(2 * n_layers), so the residual's variance
        does not grow with depth (GPT-2 / OLMo "scaled" init); RMSNorm weights are 1. Numbers are drawn on
        the CPU in float32 from one seeded generator, so every device and dtype gets the same model."""
        g = torch.Generator().manual_seed(seed)
        small = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            w = torch.empty(p.shape, dtype=torch.float32)
            if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
                w.fill_(1.0)
            elif name.endswith("attn_out.weight") or ".blocks." in name and name.endswith("ff_out.weight"):
                w.normal_(0.0, small, generator=g)
            else:
                w.normal_(0.0, 0.02, generator=g)
            with torch.no_grad():
                p.copy_(w)

    @classmethod
    def from_config(cls, config: LLaDAConfig, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", seed: int = 0) -> LLaDA:
        with torch.device("meta"):
            model = cls(config)
            model.to(dtype)  # on meta: free; then allocate once, directly in the target dtype
        model.to_empty(device=device)
        model.tie_weights()  # to_empty() gives each name its own tensor; share the head with wte again
        model.init_weights(seed)
        return model

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu") -> LLaDA:
        path = Path(path)
        config = LLaDAConfig.from_json(path / "config.json")
        with torch.device("meta"):
            model = cls(config)
        tensors, key_file = _read_dir(path, dtype=None)  # mmap-backed, file dtype
        expected = model.state_dict()
        if config.weight_tying:  # tied head: the file has no separate head tensor
            expected.pop("model.transformer.ff_out.weight")
        for key, t in tensors.items():
            if key not in expected:
                raise CheckpointError(f"{key_file[key]}: unexpected key '{key}' (not a parameter of this model)")
            if t.shape != expected[key].shape:
                raise CheckpointError(f"{key_file[key]}: key '{key}' has shape {list(t.shape)}, "
                                      f"config.json implies {list(expected[key].shape)}")
        for key in expected:
            if key not in tensors:
                where = path / (INDEX_NAME if (path / INDEX_NAME).exists() else SINGLE_NAME)
                raise CheckpointError(f"{where}: missing key '{key}'")
        # Convert and move per tensor, dropping each mmap view as we go: a shard's mapping is released once
        # all its tensors are converted, so RAM holds the converted model plus at most one shard's pages.
        # When dtype and device already match, .to() returns the mmap-backed tensor itself (no copy).
        state = {}
        for key in list(tensors):
            t = tensors.pop(key)
            state[key] = t.to(device=device, dtype=dtype or t.dtype)
        model.load_state_dict(state, strict=not config.weight_tying, assign=True)
        model.tie_weights()  # assign=True replaced wte.weight; point the head at it again
        model.source_dir = str(path)
        return model

    def save_pretrained(self, out_dir: str | os.PathLike, state_dict: dict | None = None,
                        max_shard_bytes: int = 5 * 2**30) -> None:
        save_checkpoint(out_dir, self.config, self.state_dict() if state_dict is None else state_dict,
                        source_dir=self.source_dir, max_shard_bytes=max_shard_bytes)


class Transformer(nn.Module):
    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.embedding_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.ff_out = nn.Linear(cfg.d_model, cfg.embedding_size, bias=False)  # LM head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                use_checkpointing: bool) -> torch.Tensor:
        B, L = input_ids.shape
        x = self.wte(input_ids)  # [B, L, d]
        cos, sin = rope_cos_sin(L, self.cfg.head_dim, self.cfg.rope_theta, x.device)  # [L, hd] fp32
        mask = None
        if attention_mask is not None:
            # Key-padding mask [B, 1, 1, L], True = may attend. Padding queries still see the real keys,
            # so their rows are finite (and ignored by the caller). A sequence with no real token at all
            # would give an all-False row -> NaN from softmax; let such rows attend everywhere instead.
            keep = attention_mask.bool()
            keep = keep | ~keep.any(dim=-1, keepdim=True)
            mask = keep[:, None, None, :]
        for block in self.blocks:
            if use_checkpointing:
                # Keep only each block's input; recompute its activations during backward.
                x = checkpoint(block, x, cos, sin, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask)
        return self.ln_f(x)  # [B, L, d]


class Block(nn.Module):
    """Pre-norm Llama block. Attention layers sit directly in the block (q_proj, ..., ff_out) because the
    checkpoint keys are flat: blocks.{i}.q_proj.weight, not blocks.{i}.attn.q_proj.weight."""

    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        d, kv, mlp = cfg.d_model, cfg.kv_dim, cfg.mlp_hidden_size
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv, bias=False)
        self.v_proj = nn.Linear(d, kv, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.ff_proj = nn.Linear(d, mlp, bias=False)  # gate, goes through SiLU
        self.up_proj = nn.Linear(d, mlp, bias=False)
        self.ff_out = nn.Linear(mlp, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        B, L, _ = x.shape
        n = self.attn_norm(x)
        q = self.q_proj(n).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)     # [B, H, L, hd]
        k = self.k_proj(n).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, L, hd]
        v = self.v_proj(n).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, L, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.n_kv_heads != self.n_heads:
            # GQA: repeat each kv head for its group. Explicit, rather than SDPA's enable_gqa, because not
            # every SDPA backend supports enable_gqa together with a padding mask.
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # [B, H, L, hd]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False)   # [B, H, L, hd]
        h = x + self.attn_out(a.transpose(1, 2).reshape(B, L, -1))                      # [B, L, d]
        n = self.ff_norm(h)
        return h + self.ff_out(F.silu(self.ff_proj(n)) * self.up_proj(n))              # [B, L, d]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As the reference: normalise in float32 (bf16 squares lose precision), cast back, then scale.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(seq_len: int, head_dim: int, theta: float, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [L, head_dim] in float32 for positions 0..L-1. Computed per forward (cheap: L x head_dim)
    rather than kept as buffers, so nothing extra lands in state_dict and meta-device builds just work."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim)
    freqs = torch.outer(torch.arange(seq_len, device=device).float(), inv_freq)  # [L, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)                                        # [L, hd]
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Non-interleaved "rotate half" RoPE on x [B, H, L, hd], in float32 like the reference."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


# ------------------------------------------------------------------------------------------------
# Reading and writing safetensors checkpoints
# ------------------------------------------------------------------------------------------------

SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_AUTO_MAP = {"AutoConfig": "configuration_llada.LLaDAConfig",
                    "AutoModel": "modeling_llada.LLaDAModelLM",
                    "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"}
# Files beside the weights that make an export a drop-in replacement (tokenizer, chat template, remote code).
COPY_SUFFIXES = (".py", ".json", ".model", ".txt", ".tiktoken", ".jinja")
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of one .safetensors file as views of a private, read-on-demand mmap of it.

    torch.UntypedStorage.from_file(shared=False) maps the file MAP_PRIVATE (as torch.load(mmap=True)
    does): pages are read when first touched, writes stay in this process. safetensors' own
    safe_open().get_tensor() copies every tensor out of its mmap, which holds both copies at once."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: shard file not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise CheckpointError(f"{path}: truncated or not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: corrupt safetensors header") from None
    header.pop("__metadata__", None)
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
    flat = torch.empty(0, dtype=torch.uint8).set_(storage)  # [size] bytes
    out = {}
    for key, info in header.items():
        begin, end = (8 + n + o for o in info["data_offsets"])
        if end > size:
            raise CheckpointError(f"{path}: key '{key}' lies past the end of the file (truncated shard)")
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{path}: key '{key}' has unsupported dtype {info['dtype']}")
        raw = flat[begin:end]
        if begin % dtype.itemsize:  # a view needs an aligned offset; copy the rare misaligned tensor
            raw = raw.clone()
        out[key] = raw.view(dtype).view(info["shape"])
    return out


def _read_dir(path: Path, dtype: torch.dtype | None) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """All tensors of a checkpoint directory and, per key, the file it came from (for error messages)."""
    index_path = path / INDEX_NAME
    if index_path.exists():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index_path}: not a safetensors index (no 'weight_map')") from None
        shards: dict[str, list[str]] = {}
        for key, shard in weight_map.items():
            shards.setdefault(shard, []).append(key)
        for shard, keys in shards.items():
            if not (path / shard).is_file():
                raise CheckpointError(f"{index_path}: key '{keys[0]}' is in shard {shard}, which is missing")
    elif (path / SINGLE_NAME).exists():
        weight_map, shards = None, {SINGLE_NAME: []}
    else:
        raise CheckpointError(f"{path}: no {SINGLE_NAME} or {INDEX_NAME}")
    tensors, key_file = {}, {}
    for shard in shards:
        for key, t in read_safetensors(path / shard).items():
            if weight_map is not None and weight_map.get(key) != shard:
                raise CheckpointError(f"{path / shard}: key '{key}' is not listed for this shard in {INDEX_NAME}")
            tensors[key] = t if dtype is None else t.to(dtype)
            key_file[key] = path / shard
    for key, shard in (weight_map or {}).items():
        if key not in tensors:
            raise CheckpointError(f"{path / shard}: missing key '{key}' (listed in {INDEX_NAME})")
    return tensors, key_file


def read_safetensors_dir(path: str | os.PathLike, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (single file or sharded with index), mmap-backed when no
    dtype conversion is asked for; validated against the index. For per-rank (FSDP) loading."""
    return _read_dir(Path(path), dtype)[0]


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Stream tensors into one safetensors file. Our own writer, because safetensors.torch.save_file refuses
    tensors that share a storage, which every mmap-loaded tensor of a shard does."""
    header, offset = {"__metadata__": {"format": "pt", **(metadata or {})}}, 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[key] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # 8-byte aligned data start, so readers can view tensors in place
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for t in tensors.values():
            t = t.detach().to("cpu").contiguous().reshape(-1)
            f.write(t.view(torch.uint8).numpy().data)


def save_checkpoint(out_dir: str | os.PathLike, config: LLaDAConfig, state_dict: dict[str, torch.Tensor], *,
                    source_dir: str | None = None, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write an HF-style LLaDA directory: model-0000i-of-0000N.safetensors + index, config.json, and the
    tokenizer / remote-code files of source_dir. Everything goes to a temporary sibling directory that is
    renamed into place at the end, so an interrupted save never looks like a complete checkpoint."""
    out = Path(out_dir).absolute()
    # Replace only an empty directory or a previous export (config + weights), never e.g. a run directory.
    if out.exists() and (not out.is_dir() or any(out.iterdir()) and not (
            (out / "config.json").exists() and ((out / INDEX_NAME).exists() or (out / SINGLE_NAME).exists()))):
        raise CheckpointError(f"{out}: exists and is not an earlier checkpoint export; refusing to overwrite")
    state = {k: v for k, v in state_dict.items()
             if not (config.weight_tying and k == "model.transformer.ff_out.weight")}
    # Plan the shards first: the file names carry the shard count.
    shards: list[list[str]] = [[]]
    size = 0
    for key, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weight_map = {}
    for i, keys in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(tmp / name, {k: state[k] for k in keys})
        weight_map.update({k: name for k in keys})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    if source_dir and Path(source_dir).is_dir():
        for f in sorted(Path(source_dir).iterdir()):
            if f.is_file() and f.suffix in COPY_SUFFIXES and f.name != "config.json" and not f.name.endswith(".index.json"):
                shutil.copy2(f, tmp / f.name)
    cfg = config.to_dict()
    cfg["architectures"] = ["LLaDAModelLM"]
    cfg.setdefault("auto_map", DEFAULT_AUTO_MAP)
    cfg.setdefault("model_type", "llada")
    floats = [t.dtype for t in state.values() if t.is_floating_point()]
    if floats:
        cfg["torch_dtype"] = str(floats[0]).removeprefix("torch.")
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    # Swap in: move an older export aside first (never delete before the new one is in place).
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# FLOPs
# ------------------------------------------------------------------------------------------------

def training_flops_per_token(config: LLaDAConfig, seq_len: int, *, frozen_base: bool = False,
                             lora_params: int = 0) -> float:
    """Model FLOPs of one training token (forward + backward; checkpoint recomputation not counted).

    A weight matrix with N entries costs 2N per token forward (a multiply-add per entry), 2N backward for
    the gradient of its input and 2N for the gradient of the weight: 6N trainable, 4N frozen (no weight
    gradient, but the input gradient still flows down to the layers below). The embedding is a lookup,
    no matmul, so it counts nothing either way; the LM head counts in full, at every position.
    LoRA matrices are trainable matmuls: 6 per parameter. Attention scores and the weighted sum of values
    cost 2 * L * d each per token and layer forward, x3 for forward + backward: 12 * n_layers * d * L.
    LLaDA attention is bidirectional, so every query sees all L keys (no halving as for causal models).
    """
    c = config
    matmul = c.n_layers * (2 * c.d_model * c.d_model + 2 * c.kv_dim * c.d_model + 3 * c.mlp_hidden_size * c.d_model)
    matmul += c.embedding_size * c.d_model  # LM head (tied or not, it is a matmul)
    dense = (4 if frozen_base else 6) * matmul
    return float(dense + 6 * lora_params + 12 * c.n_layers * c.d_model * seq_len)


if __name__ == "__main__":
    # `python model.py CKPT_DIR`: check that a checkpoint loads (config, every shard, every key and shape).
    import sys
    if len(sys.argv) != 2:
        sys.exit("usage: python model.py CHECKPOINT_DIR")
    try:
        m = LLaDA.from_pretrained(sys.argv[1])
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    c = m.config
    print(f"{sys.argv[1]}: {sum(p.numel() for p in m.parameters()):,} parameters, d_model {c.d_model}, "
          f"{c.n_layers} layers, {c.n_heads} heads ({c.n_kv_heads} kv), vocab {c.vocab_size}")
