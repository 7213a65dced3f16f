"""model.py against an independent reference (transformers' Llama), checkpoint round trips and errors."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from model import (LLaDA, LLaDAConfig, CheckpointError, MODEL_SIZES, read_safetensors_dir,  # noqa: E402
                   training_flops_per_token)

# A config.json as LLaDA ships it (shrunk): the extra fields must survive a load/save round trip.
REAL_STYLE_CONFIG = {
    "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
    "attention_dropout": 0.0, "attention_layer_norm": False, "block_group_size": 1, "block_type": "llama",
    "d_model": 64, "embedding_size": 96, "eos_token_id": 90, "flash_attention": False, "include_bias": False,
    "include_qkv_bias": False, "init_fn": "mitchell", "init_std": 0.02, "layer_norm_type": "rms",
    "mask_token_id": 95, "max_sequence_length": 128, "mlp_hidden_size": 160, "mlp_ratio": 4,
    "model_type": "llada", "multi_query_attention": None, "n_heads": 4, "n_kv_heads": 4, "n_layers": 2,
    "pad_token_id": 90, "precision": "amp_bf16", "rms_norm_eps": 1e-05, "rope": True, "rope_full_precision": True,
    "rope_theta": 500000.0, "scale_logits": False, "use_cache": False, "vocab_size": 96, "weight_tying": False,
    "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM"},
}


def small_config(**kw) -> LLaDAConfig:
    return LLaDAConfig.from_name("tiny", **{"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 4,
                                            "mlp_hidden_size": 160, "vocab_size": 96, **kw})


def random_model(cfg: LLaDAConfig, seed: int = 0) -> LLaDA:
    model = LLaDA.from_config(cfg, seed=seed)
    with torch.no_grad():  # norms away from 1 so their weights are exercised too
        for name, p in model.named_parameters():
            if "norm" in name or "ln_f" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()


def to_llama(model: LLaDA):
    """The same weights in transformers' LlamaForCausalLM (eager attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    c = model.config
    hf_cfg = LlamaConfig(vocab_size=c.embedding_size, hidden_size=c.d_model, intermediate_size=c.mlp_hidden_size,
                         num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
                         head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps, max_position_embeddings=c.max_sequence_length,
                         rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
                         tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
    hf_cfg._attn_implementation = "eager"
    hf = LlamaForCausalLM(hf_cfg).eval()
    names = {"attn_norm": "input_layernorm", "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj",
             "v_proj": "self_attn.v_proj", "attn_out": "self_attn.o_proj", "ff_norm": "post_attention_layernorm",
             "ff_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "ff_out": "mlp.down_proj"}
    sd = {}
    for key, t in model.state_dict().items():
        parts = key.split(".")  # model.transformer.<...>
        if parts[2] == "blocks":
            sd[f"model.layers.{parts[3]}.{names[parts[4]]}.weight"] = t
        else:
            sd[{"wte": "model.embed_tokens.weight", "ln_f": "model.norm.weight", "ff_out": "lm_head.weight"}[parts[2]]] = t
    hf.load_state_dict(sd, strict=True)
    return hf


def llama_bidirectional_logits(hf, ids: torch.Tensor) -> torch.Tensor:
    B, L = ids.shape
    mask = torch.zeros(B, 1, L, L)  # 4-D additive mask, all zeros: every query sees every key
    return hf(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_matches_transformers_llama_bidirectional(n_kv_heads):
    torch.manual_seed(0)
    model = random_model(small_config(n_kv_heads=n_kv_heads))
    hf = to_llama(model)
    ids = torch.randint(0, 96, (2, 17))
    with torch.no_grad():
        ours, ref = model(ids), llama_bidirectional_logits(hf, ids)
        assert (ours - ref).abs().max().item() <= 1e-5
        # The reference really is bidirectional: changing the LAST token moves the FIRST position's logits,
        # which a causal mask would forbid; and the default causal Llama differs from us.
        ids2 = ids.clone()
        ids2[:, -1] = (ids2[:, -1] + 1) % 96
        assert (llama_bidirectional_logits(hf, ids2)[:, 0] - ref[:, 0]).abs().max() > 1e-4
        assert (model(ids2) - llama_bidirectional_logits(hf, ids2)).abs().max().item() <= 1e-5
        assert (hf(input_ids=ids).logits - ours).abs().max() > 1e-4


def test_llada_8b_param_count_on_meta():
    cfg = LLaDAConfig.from_name("llada-8b")
    assert cfg.num_params() == 8_015_581_184
    with torch.device("meta"):
        model = LLaDA(cfg)
    assert sum(p.numel() for p in model.parameters()) == 8_015_581_184
    assert all(k.startswith("model.transformer.") for k in model.state_dict())
    assert "model.transformer.blocks.31.attn_out.weight" in model.state_dict()
    assert LLaDAConfig.from_name("llada-1b").num_params() == 1_487_243_264
    tiny = LLaDAConfig.from_name("tiny")
    assert tiny.num_params() - 2 * tiny.embedding_size * tiny.d_model < 1_000_000
    assert set(MODEL_SIZES) >= {"tiny", "llada-1b", "llada-8b"}


def test_state_dict_keys_are_checkpoint_keys():
    keys = set(random_model(small_config(n_layers=1)).state_dict())
    block = {f"model.transformer.blocks.0.{n}.weight" for n in
             ["attn_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_norm", "ff_proj", "up_proj", "ff_out"]}
    assert keys == block | {f"model.transformer.{n}.weight" for n in ["wte", "ln_f", "ff_out"]}


def write_checkpoint(tmp_path: Path, model: LLaDA, **kw) -> Path:
    out = tmp_path / "ckpt"
    model.save_pretrained(out, **kw)
    return out


def test_sharded_round_trip_exact_and_config_preserved(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(REAL_STYLE_CONFIG))
    for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                 "modeling_llada.py", "configuration_llada.py"]:
        (src / name).write_text("{}" if name.endswith(".json") else "# remote code\n")
    cfg = LLaDAConfig.from_json(src / "config.json")
    assert cfg.extra["init_fn"] == "mitchell" and cfg.extra["multi_query_attention"] is None
    model = random_model(cfg)
    model.save_pretrained(src / "w", max_shard_bytes=20_000)  # one-off single-file layout for the source
    (src / "w" / "model.safetensors.index.json").unlink()
    shards = sorted((src / "w").glob("*.safetensors"))
    from safetensors.torch import load_file, save_file
    save_file({k: v for s in shards for k, v in load_file(s).items()}, src / "model.safetensors")

    loaded = LLaDA.from_pretrained(src)  # single model.safetensors
    assert loaded.source_dir == str(src)
    out = tmp_path / "export"
    loaded.save_pretrained(out, max_shard_bytes=30_000)
    files = sorted(p.name for p in out.glob("model-*.safetensors"))
    n = len(files)
    assert n > 2 and files[0] == f"model-00001-of-{n:05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in model.state_dict().values())
    for name in ["tokenizer.json", "generation_config.json", "modeling_llada.py", "configuration_llada.py"]:
        assert (out / name).exists()
    saved = json.loads((out / "config.json").read_text())
    for k, v in REAL_STYLE_CONFIG.items():
        assert saved[k] == v, k
    assert saved["torch_dtype"] == "float32" and saved["architectures"] == ["LLaDAModelLM"]

    # Shards are valid safetensors for the reference reader, and our reader gives the same tensors.
    ours = read_safetensors_dir(out)
    for f in files:
        for k, v in load_file(out / f).items():
            assert torch.equal(ours[k], v)
    again = LLaDA.from_pretrained(out)
    ids = torch.randint(0, 96, (2, 11))
    with torch.no_grad():
        assert torch.equal(model(ids), again(ids))
        assert torch.equal(model(ids), loaded(ids))
    # Re-exporting over a previous export replaces it; a bf16 load converts per tensor.
    again.save_pretrained(out, max_shard_bytes=10**9)
    assert len(list(out.glob("model-*.safetensors"))) == 1 and (out / "tokenizer.json").exists()
    bf16 = LLaDA.from_pretrained(out, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())


def test_default_auto_map_and_refuses_foreign_dir(tmp_path):
    model = random_model(small_config())
    out = write_checkpoint(tmp_path, model)
    saved = json.loads((out / "config.json").read_text())
    assert saved["auto_map"]["AutoModel"] == "modeling_llada.LLaDAModelLM"
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="refusing"):
        model.save_pretrained(foreign)
    assert (foreign / "todo.txt").read_text() == "keep me"
    (foreign / "config.json").write_text("{}")  # a run directory with a config is not an export either
    with pytest.raises(CheckpointError, match="refusing"):
        model.save_pretrained(foreign)
    assert (foreign / "todo.txt").read_text() == "keep me"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_mask_matches_unpadded(side):
    model = random_model(small_config(n_kv_heads=2))
    torch.manual_seed(1)
    lengths = [13, 7, 10]
    L = max(lengths)
    seqs = [torch.randint(0, 90, (n,)) for n in lengths]
    ids = torch.full((3, L), 90)
    mask = torch.zeros(3, L, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(L - len(s), L) if side == "left" else slice(0, len(s))
        ids[i, sl], mask[i, sl] = s, 1
    with torch.no_grad():
        batched = model(ids, attention_mask=mask)
        assert torch.isfinite(batched).all()
        for i, s in enumerate(seqs):
            single = model(s[None])[0]
            real = batched[i][mask[i].bool()]
            assert (real - single).abs().max().item() <= 1e-5
        # Without the mask the padding leaks into the real positions.
        assert (model(ids)[1][mask[1].bool()] - model(seqs[1][None])[0]).abs().max() > 1e-4
        # A row with no real token at all must not produce NaN.
        mask[0] = 0
        assert torch.isfinite(model(ids, attention_mask=mask)).all()


def test_head_callable_selected_positions():
    model = random_model(small_config())
    ids = torch.randint(0, 96, (2, 9))
    sel = ids % 3 == 0
    with torch.no_grad():
        full = model(ids)
        picked = model(ids, head=lambda h, lm_head: lm_head(h[sel]))
    assert picked.shape == (int(sel.sum()), 96)
    assert (picked - full[sel]).abs().max().item() <= 1e-6


def test_gradient_checkpointing_same_grads():
    model = random_model(small_config(n_kv_heads=2)).train()
    ids = torch.randint(0, 96, (2, 12))
    mask = torch.ones(2, 12)
    mask[1, :3] = 0

    def grads():
        model.zero_grad()
        model(ids, attention_mask=mask).float().pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.gradient_checkpointing = True
    ckpt = grads()
    for n in plain:
        assert torch.allclose(plain[n], ckpt[n], atol=1e-6, rtol=1e-5), n


def test_init_scheme():
    cfg = small_config(n_layers=8, d_model=128, mlp_hidden_size=384)
    model = LLaDA.from_config(cfg, seed=3)
    sd = model.state_dict()
    assert torch.equal(sd["model.transformer.ln_f.weight"], torch.ones(128))
    assert abs(sd["model.transformer.blocks.0.q_proj.weight"].std().item() - 0.02) < 0.002
    small = 0.02 / math.sqrt(16)
    assert abs(sd["model.transformer.blocks.0.attn_out.weight"].std().item() - small) < 0.001
    assert abs(sd["model.transformer.blocks.0.ff_out.weight"].std().item() - small) < 0.001
    assert abs(sd["model.transformer.ff_out.weight"].std().item() - 0.02) < 0.002  # LM head: not scaled
    assert torch.equal(LLaDA.from_config(cfg, seed=3).state_dict()["model.transformer.wte.weight"],
                       sd["model.transformer.wte.weight"])
    bf = LLaDA.from_config(cfg, dtype=torch.bfloat16, seed=3)
    assert torch.equal(bf.state_dict()["model.transformer.wte.weight"], sd["model.transformer.wte.weight"].bfloat16())


def test_weight_tying_round_trip(tmp_path):
    model = random_model(small_config(weight_tying=True))
    assert model.model.transformer.ff_out.weight is model.model.transformer.wte.weight
    out = write_checkpoint(tmp_path, model)
    assert "model.transformer.ff_out.weight" not in read_safetensors_dir(out)
    again = LLaDA.from_pretrained(out)
    assert again.model.transformer.ff_out.weight is again.model.transformer.wte.weight
    ids = torch.randint(0, 96, (1, 8))
    with torch.no_grad():
        assert torch.equal(model(ids), again(ids))


# ---- errors: one line, naming the file and the key ----------------------------------------------

@pytest.fixture
def ckpt(tmp_path) -> Path:
    return write_checkpoint(tmp_path, random_model(small_config()), max_shard_bytes=60_000)


def expect_error(path, *needles):
    with pytest.raises(CheckpointError) as e:
        LLaDA.from_pretrained(path)
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, (n, msg)


def test_error_no_config(ckpt):
    (ckpt / "config.json").unlink()
    expect_error(ckpt, "config.json")


def test_error_missing_field(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["n_layers"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    expect_error(ckpt, "config.json", "n_layers")


def shard(ckpt: Path, i: int) -> Path:
    return sorted(ckpt.glob("model-*.safetensors"))[i]


def test_error_missing_shard(ckpt):
    second = shard(ckpt, 1)
    second.unlink()
    expect_error(ckpt, "model.safetensors.index.json", second.name, "model.transformer.")


def test_error_truncated_shard(ckpt):
    second = shard(ckpt, 1)
    data = second.read_bytes()
    second.write_bytes(data[: len(data) - 100])
    expect_error(ckpt, str(second), "model.transformer.")


def test_error_shape_mismatch(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["mlp_hidden_size"] = 128
    (ckpt / "config.json").write_text(json.dumps(cfg))
    expect_error(ckpt, "model-0000", "ff_proj.weight", "[160, 64]", "[128, 64]")


def test_error_unexpected_and_missing_key(tmp_path):
    model = random_model(small_config())
    sd = dict(model.state_dict())
    sd["model.transformer.blocks.0.q_proj.bias"] = torch.zeros(64)
    out = tmp_path / "extra"
    model.save_pretrained(out, state_dict=sd)
    expect_error(out, "model-00001-of-00001.safetensors", "model.transformer.blocks.0.q_proj.bias", "unexpected")
    del sd["model.transformer.blocks.0.q_proj.bias"], sd["model.transformer.blocks.1.up_proj.weight"]
    out = tmp_path / "missing"
    model.save_pretrained(out, state_dict=sd)
    expect_error(out, "model.safetensors.index.json", "model.transformer.blocks.1.up_proj.weight", "missing")


def test_error_key_not_in_index(ckpt):
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    key = next(iter(index["weight_map"]))
    del index["weight_map"][key]
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    expect_error(ckpt, shard(ckpt, 0).name, key)


def test_error_unsupported_architecture(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["block_type"] = "sequential"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    expect_error(ckpt, "config.json", "block_type")


def test_cli_exit_codes(ckpt):
    ok = subprocess.run([sys.executable, str(ROOT / "model.py"), str(ckpt)], capture_output=True, text=True)
    assert ok.returncode == 0 and "parameters" in ok.stdout
    (ckpt / "config.json").unlink()
    bad = subprocess.run([sys.executable, str(ROOT / "model.py"), str(ckpt)], capture_output=True, text=True)
    assert bad.returncode == 1 and "config.json" in bad.stderr and "Traceback" not in bad.stderr


def test_load_rss_script_parts_on_tiny(tmp_path):
    # In-process (the script itself runs these in fresh subprocesses, which is too slow for the suite).
    sys.path.insert(0, str(ROOT / "scripts"))
    import load_rss
    load_rss.create_checkpoint(tmp_path / "c", "tiny", shard_bytes=200_000)
    assert len(list((tmp_path / "c").glob("*.safetensors"))) > 1
    r = load_rss.measure(tmp_path / "c", "mmap", "bfloat16")
    assert r["params"] == LLaDAConfig.from_name("tiny").num_params()
    assert r["peak_after_reading_mb"] >= r["peak_after_load_mb"] > 0


def test_flops_per_token():
    cfg = LLaDAConfig.from_name("llada-8b")
    matmul = cfg.num_params() - cfg.embedding_size * cfg.d_model - (2 * cfg.n_layers + 1) * cfg.d_model
    attn = 12 * 32 * 4096 * 4096
    assert training_flops_per_token(cfg, 4096) == 6 * matmul + attn
    assert training_flops_per_token(cfg, 4096, frozen_base=True, lora_params=1000) == 4 * matmul + 6000 + attn
