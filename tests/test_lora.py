"""LoRA: injection, training step, merge, PEFT format and interop, save/load, merge CLI. Tiny model, CPU, fp32."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora
from lora import LoRAConfig, LoRALinear
from model import LLaDA, LLaDAConfig

VOCAB = 64
HEAD = "model.transformer.ff_out"


def tiny(dtype=torch.float32, seed=0) -> LLaDA:
    return LLaDA.from_config(LLaDAConfig.from_name("tiny", vocab_size=VOCAB), dtype=dtype, seed=seed)


def ids(b=2, length=12, seed=0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, length), generator=torch.Generator().manual_seed(seed))


def randomize_b(model, seed=1) -> None:
    """B starts at zero, which would make every comparison below trivially pass."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora.lora_layers(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.05)


def adapted(targets=None, dropout=0.0, seed=1) -> LLaDA:
    model = tiny()
    lora.inject_lora(model, LoRAConfig(r=4, alpha=8.0, dropout=dropout, **({"targets": targets} if targets else {})))
    randomize_b(model, seed)
    return model.eval()


@torch.no_grad()
def logits(model, x=None) -> torch.Tensor:
    return model(ids() if x is None else x).float()


# ---------------------------------------------------------------------------------------------------------------
# Injection and training


def test_zero_b_leaves_outputs_unchanged_and_freezes_base():
    base, model = tiny(), tiny()
    names = lora.inject_lora(model, LoRAConfig())
    assert len(names) == 7 * base.config.n_layers and HEAD not in names
    assert torch.equal(logits(base.eval()), logits(model.eval()))
    assert set(model.state_dict()) - set(base.state_dict()) == {f"{n}.{w}.weight" for n in names for w in ("lora_A", "lora_B")}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(re.search(r"\.lora_[AB]\.weight$", n) for n in trainable)
    n_lora = sum(m.lora_A.weight.numel() + m.lora_B.weight.numel() for m in lora.lora_layers(model).values())
    assert lora.count_parameters(model) == (n_lora, sum(p.numel() for p in base.parameters()))
    assert "trainable" in lora.lora_summary(model) and "\n" not in lora.lora_summary(model)


def test_one_optimizer_step_changes_only_lora_tensors():
    base_sd = {k: v.clone() for k, v in tiny().state_dict().items()}
    model = tiny()
    lora.inject_lora(model, LoRAConfig(r=4, alpha=8.0, dropout=0.1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.1)
    x = ids()
    loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
    loss.backward()
    opt.step()
    after = model.state_dict()
    for k, v in base_sd.items():
        assert torch.equal(after[k], v), k
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert {k for k in changed if k.endswith("lora_B.weight")} == {k for k in after if k.endswith("lora_B.weight")}
    assert all(".lora_" in k for k in changed)


def test_targets_ff_out_is_the_mlp_and_the_head_needs_its_full_name():
    model = tiny()
    names = lora.inject_lora(model, LoRAConfig(targets=["ff_out"]))
    assert names == [f"model.transformer.blocks.{i}.ff_out" for i in range(4)]
    assert not isinstance(model.model.transformer.ff_out, LoRALinear)
    model = tiny()
    assert lora.inject_lora(model, LoRAConfig(targets=[HEAD, "q_proj"]))[-1] == HEAD
    assert isinstance(model.model.transformer.ff_out, LoRALinear)


@pytest.mark.parametrize("target, hint", [("o_proj", "attn_out"), ("gate_proj", "ff_proj"), ("down_proj", "ff_out"),
                                          ("nonexistent", "")])
def test_target_matching_nothing_lists_the_names(target, hint):
    with pytest.raises(ValueError) as e:
        lora.inject_lora(tiny(), LoRAConfig(targets=["q_proj", target]))
    msg = str(e.value)
    assert "\n" not in msg and f"'{target}'" in msg and "lora.targets" in msg
    assert all(leaf in msg for leaf in lora.BLOCK_LINEARS) and HEAD in msg
    assert f"LLaDA calls it '{hint}'" in msg if hint else "Llama" not in msg


def test_bad_values_and_double_injection_fail():
    for bad in (dict(r=0), dict(alpha=0.0), dict(dropout=1.0), dict(targets=[])):
        with pytest.raises(ValueError, match="lora."):
            lora.inject_lora(tiny(), LoRAConfig(**bad))
    model = tiny()
    lora.inject_lora(model, LoRAConfig())
    with pytest.raises(ValueError, match="already"):
        lora.inject_lora(model, LoRAConfig())


def test_bf16_base_with_fp32_lora():
    model = tiny(dtype=torch.bfloat16)
    lora.inject_lora(model, LoRAConfig(r=4, alpha=8.0))
    randomize_b(model)
    m = model.model.transformer.blocks[0].q_proj
    assert m.weight.dtype == torch.bfloat16 and m.lora_A.weight.dtype == m.lora_B.weight.dtype == torch.float32
    out = model(ids())  # no autocast: the fp32 LoRA weights are cast to the bf16 activations
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    assert m.lora_B.weight.grad.dtype == torch.float32 and m.lora_B.weight.grad.abs().sum() > 0
    assert m.weight.grad is None
    # fp32 base under autocast: what the trainer does on GPU
    model = adapted()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids())
    assert out.dtype == torch.bfloat16
    assert (out.float() - logits(model)).abs().max() < 0.1


# ---------------------------------------------------------------------------------------------------------------
# Merging


def test_merge_equals_base_plus_adapter_and_is_idempotent():
    model = adapted()
    expected = logits(model)
    w0 = {n: m.weight.detach().clone() for n, m in lora.lora_layers(model).items()}
    sd_before = {k: v.clone() for k, v in model.state_dict().items()}
    merged_sd = lora.merged_state_dict(model)  # pure: the model is unchanged
    assert all(torch.equal(v, sd_before[k]) for k, v in model.state_dict().items())
    assert set(merged_sd) == set(tiny().state_dict())

    for m in lora.lora_layers(model).values():
        m.merge()
        m.merge()
    assert (logits(model) - expected).abs().max() <= 1e-5
    assert all(torch.equal(merged_sd[f"{n}.weight"], m.weight) for n, m in lora.lora_layers(model).items())
    assert lora.merged_state_dict(model).keys() == merged_sd.keys()  # merged layers are not folded twice
    assert all(torch.equal(v, merged_sd[k]) for k, v in lora.merged_state_dict(model).items())
    for m in lora.lora_layers(model).values():
        m.unmerge()
        m.unmerge()
    assert all((m.weight - w0[n]).abs().max() < 1e-6 for n, m in lora.lora_layers(model).items())
    assert (logits(model) - expected).abs().max() <= 1e-5

    # An independent reference: a plain model (no LoRA modules) holding the merged weights.
    plain = tiny()
    plain.load_state_dict(merged_sd)
    assert (logits(plain.eval()) - expected).abs().max() <= 1e-5


def test_merge_state_dict_is_pure_and_matches_in_module_merge(tmp_path):
    targets = ["q_proj", "ff_out", HEAD]
    model = adapted(targets=targets)
    base_sd = {k: v.clone() for k, v in tiny().state_dict().items()}
    base_copy = {k: v.clone() for k, v in base_sd.items()}
    adapter_sd = lora.adapter_state_dict(model)
    adapter_copy = {k: v.clone() for k, v in adapter_sd.items()}
    cfg = LoRAConfig(r=4, alpha=8.0, targets=targets)
    lora.save_adapter(model, tmp_path / "a", cfg, "base")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    merged = lora.merge_state_dict(base_sd, adapter_sd, config)
    assert all(torch.equal(base_sd[k], base_copy[k]) for k in base_copy)
    assert all(torch.equal(adapter_sd[k], adapter_copy[k]) for k in adapter_copy)
    reference = lora.merged_state_dict(model)
    assert merged.keys() == reference.keys()
    assert all(torch.equal(merged[k], reference[k]) for k in merged)
    assert not torch.equal(merged[f"{HEAD}.weight"], base_sd[f"{HEAD}.weight"])
    # The same from other key spellings: PEFT's in-memory ".default" infix, and our model's own state dict with
    # a LoRAConfig (what the trainer has after gathering FSDP shards).
    with_default = {k.replace(".weight", ".default.weight"): v for k, v in adapter_sd.items()}
    full = model.state_dict()
    for other in (lora.merge_state_dict(base_sd, with_default, config),
                  lora.merge_state_dict({k: v for k, v in full.items() if "lora_" not in k},
                                        {k: v for k, v in full.items() if "lora_" in k}, cfg)):
        assert other.keys() == merged.keys() and all(torch.equal(v, merged[k]) for k, v in other.items())
    with pytest.raises(ValueError, match="lora_B"):
        lora.merge_state_dict(base_sd, {k: v for k, v in adapter_sd.items() if "lora_A" in k}, config)
    with pytest.raises(ValueError, match="r=8"):
        lora.merge_state_dict(base_sd, adapter_sd, {**config, "r": 8})
    with pytest.raises(ValueError, match="use_rslora"):
        lora.merge_state_dict(base_sd, adapter_sd, {**config, "use_rslora": True})


# ---------------------------------------------------------------------------------------------------------------
# Saving and loading (PEFT format)


def test_saved_files_follow_peft_format(tmp_path):
    model = adapted()
    lora.save_adapter(model, tmp_path / "a", LoRAConfig(r=4, alpha=8.0, dropout=0.0), "GSAI-ML/LLaDA-8B-Instruct")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temp directory left behind
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["bias"] == "none" and config["base_model_name_or_path"] == "GSAI-ML/LLaDA-8B-Instruct"
    assert config["task_type"] is None and config["fan_in_fan_out"] is False
    names = _all_linear_names(tiny())
    assert [n for n in names if re.fullmatch(config["target_modules"], n)] == list(lora.lora_layers(model))
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    for name, m in lora.lora_layers(model).items():
        a, b = tensors.pop(f"base_model.model.{name}.lora_A.weight"), tensors.pop(f"base_model.model.{name}.lora_B.weight")
        assert a.dtype == torch.float32 and torch.equal(a, m.lora_A.weight) and torch.equal(b, m.lora_B.weight)
    assert not tensors
    # saving again replaces the directory
    lora.save_adapter(model, tmp_path / "a", LoRAConfig(r=4, alpha=8.0, dropout=0.0), "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_save_from_full_state_dict_equals_save_from_model(tmp_path):
    model = adapted(targets=["k_proj", "model.transformer.blocks.1.up_proj"])
    cfg = LoRAConfig(r=4, alpha=8.0, targets=["k_proj", "model.transformer.blocks.1.up_proj"])
    lora.save_adapter(model, tmp_path / "a", cfg, "base")
    lora.save_adapter_from_state_dict(model.state_dict(), tmp_path / "b", cfg, "base")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    with pytest.raises(ValueError, match="lora.r"):
        lora.save_adapter_from_state_dict(model.state_dict(), tmp_path / "c", LoRAConfig(r=8), "base")


def test_inject_on_meta_device():
    """The FSDP path builds the model on meta and fills LoRA tensors after sharding."""
    with torch.device("meta"):
        model = LLaDA(LLaDAConfig.from_name("tiny", vocab_size=VOCAB))
    names = lora.inject_lora(model, LoRAConfig())
    assert all(m.lora_A.weight.is_meta for m in lora.lora_layers(model).values()) and len(names) == 28


def _all_linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def test_targets_regex_spells_out_partial_layers(tmp_path):
    targets = ["v_proj", "model.transformer.blocks.2.q_proj", HEAD]
    model = tiny()
    lora.inject_lora(model, LoRAConfig(targets=targets))
    lora.save_adapter(model, tmp_path / "a", LoRAConfig(targets=targets), "base")
    regex = json.loads((tmp_path / "a" / "adapter_config.json").read_text())["target_modules"]
    assert [n for n in _all_linear_names(tiny()) if re.fullmatch(regex, n)] == list(lora.lora_layers(model))
    assert "blocks\\.2\\.q_proj" in regex and "blocks\\.\\d+\\.(v_proj)" in regex


def test_save_load_round_trip_into_fresh_model(tmp_path):
    model = adapted(targets=["q_proj", "up_proj", HEAD])
    cfg = LoRAConfig(r=4, alpha=8.0, targets=["q_proj", "up_proj", HEAD])
    lora.save_adapter(model, tmp_path / "a", cfg, "base")
    fresh = tiny()  # load_adapter injects from the adapter's config
    lora.load_adapter(fresh, tmp_path / "a")
    assert list(lora.lora_layers(fresh)) == list(lora.lora_layers(model))
    assert torch.equal(logits(fresh.eval()), logits(model))
    cont = tiny()  # continue training: inject per config, then load (must agree)
    lora.apply_lora(cont, LoRAConfig(r=4, alpha=8.0, targets=cfg.targets, adapter=str(tmp_path / "a")))
    assert torch.equal(logits(cont.eval()), logits(model))
    with pytest.raises(ValueError, match="lora.r"):
        lora.apply_lora(tiny(), LoRAConfig(r=8, alpha=16.0, targets=cfg.targets, adapter=str(tmp_path / "a")))
    with pytest.raises(ValueError, match="lora.targets"):
        lora.apply_lora(tiny(), LoRAConfig(r=4, alpha=8.0, adapter=str(tmp_path / "a")))


def test_load_errors_name_file_and_key(tmp_path):
    model = adapted(targets=["q_proj"])
    lora.save_adapter(model, tmp_path / "a", LoRAConfig(r=4, alpha=8.0, targets=["q_proj"]), "base")
    path = tmp_path / "a" / "adapter_model.safetensors"
    good = load_file(str(path))
    key = "base_model.model.model.transformer.blocks.1.q_proj.lora_A.weight"
    cases = {
        "missing key": {k: v for k, v in good.items() if k != key},
        "unexpected key": {**good, **{k.replace("q_proj", "k_proj"): v.clone() for k, v in good.items() if "blocks.1." in k}},
        "has shape": {**good, key: good[key][:2].clone()},
    }
    for what, tensors in cases.items():
        save_file(tensors, str(path))
        with pytest.raises(ValueError) as e:
            lora.load_adapter(tiny(), tmp_path / "a")
        assert what in str(e.value) and str(path) in str(e.value) and "blocks.1." in str(e.value)
    with pytest.raises(ValueError, match="adapter_config.json"):
        lora.load_adapter(tiny(), tmp_path)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora"):
        lora.load_adapter(tiny(), tmp_path / "a")


def test_peft_loads_our_adapter_and_we_load_peft_adapters(tmp_path):
    peft = pytest.importorskip("peft")
    model = adapted()  # default targets: all block linears, not the head
    lora.save_adapter(model, tmp_path / "ours", LoRAConfig(r=4, alpha=8.0, dropout=0.0), "base")
    pm = peft.PeftModel.from_pretrained(tiny(), str(tmp_path / "ours")).eval()
    wrapped = sorted(n.removeprefix("base_model.model.") for n, m in pm.named_modules() if hasattr(m, "lora_A")
                     and isinstance(m.lora_A, torch.nn.ModuleDict))
    assert wrapped == sorted(lora.lora_layers(model))  # exactly ours: PEFT did not also wrap the LM head
    with torch.no_grad():
        assert (pm(ids()).float() - logits(model)).abs().max() <= 1e-5

    # The other way: PEFT's list semantics ("ff_out" is a suffix of the head's name too) are honoured on load.
    theirs = peft.get_peft_model(tiny(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj", "ff_out"]))
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape) * 0.05)
    theirs.eval().save_pretrained(str(tmp_path / "theirs"))
    ours = tiny()
    lora.load_adapter(ours, tmp_path / "theirs")
    assert HEAD in lora.lora_layers(ours) and len(lora.lora_layers(ours)) == 9
    with torch.no_grad():
        assert (theirs(ids()).float() - logits(ours.eval())).abs().max() <= 1e-5


# ---------------------------------------------------------------------------------------------------------------
# CLI


def test_merge_cli_end_to_end(tmp_path, capsys):
    base = tiny()
    base.save_pretrained(tmp_path / "base")
    model = adapted(targets=["q_proj", "ff_out"])
    lora.save_adapter(model, tmp_path / "adapter", LoRAConfig(r=4, alpha=8.0, targets=["q_proj", "ff_out"]), "base")
    lora.main(["merge", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "out")])
    merged = LLaDA.from_pretrained(tmp_path / "out").eval()
    assert not lora.lora_layers(merged)
    assert (logits(merged) - logits(model)).abs().max() <= 1e-5
    lora.main(["merge", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "out16"), "--dtype", "bf16"])
    merged16 = LLaDA.from_pretrained(tmp_path / "out16").eval()
    assert merged16.model.transformer.blocks[0].q_proj.weight.dtype == torch.bfloat16
    assert (logits(merged16) - logits(model)).abs().max() < 0.1

    with pytest.raises(SystemExit) as e:
        lora.main(["merge", str(tmp_path / "base"), str(tmp_path / "nope"), str(tmp_path / "out2")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and "adapter_config.json" in err
