"""diffusion.py against hand-computed values and independent full-logits references (CPU, fast)."""
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffusion import (DiffusionConfig, NoisyBatch, chunked_linear_cross_entropy, finish_validation,  # noqa: E402
                       generate, make_generator, naive_loss_sum, noise_batch, normalizer_count, loss_sum,
                       num_transfer_tokens, response_mask, sample_times, validation_nelbo, validation_sums)

MASK = 3


@dataclass
class FakeBatch:  # the fields of data.Batch that diffusion.py reads
    input_ids: torch.Tensor
    prompt_lengths: torch.Tensor
    answer_lengths: torch.Tensor
    indices: torch.Tensor


class FakeLM(nn.Module):
    """Bidirectional toy LM with the project's forward(input_ids, attention_mask, head) contract.

    Positions count real tokens only (cumsum of the mask) and pooling skips hidden keys, so left or right
    padding under an attention mask changes nothing, as with the real model.
    """

    def __init__(self, vocab: int = 11, d: int = 16, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb, self.pos = nn.Embedding(vocab, d), nn.Embedding(64, d)
        self.mix = nn.Linear(2 * d, d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids, attention_mask=None, head=None):
        keep = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()  # [B, L]
        x = self.emb(input_ids) + self.pos((keep.cumsum(1) - 1).clamp(min=0))  # [B, L, d]
        pooled = (x * keep[..., None]).sum(1, keepdim=True) / keep.sum(1)[:, None, None]  # [B, 1, d]
        h = torch.tanh(self.mix(torch.cat([x, pooled.expand_as(x)], -1)))  # [B, L, d]
        return self.lm_head(h) if head is None else head(h, self.lm_head)


def random_batch(B=4, L=12, vocab=11, seed=0, first_index=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (B, L), generator=g)
    prompt = torch.randint(1, L // 2, (B,), generator=g)
    answer = torch.stack([torch.randint(1, int(L - p) + 1, (), generator=g) for p in prompt])
    pos = torch.arange(L)
    ids[pos >= (prompt + answer)[:, None]] = 0  # EOS padding
    return FakeBatch(ids, prompt, answer, torch.arange(first_index, first_index + B))


# ---------------------------------------------------------------------------------------------- loss


class ZeroModel(nn.Module):
    """Hidden states all zero, so every logit is 0 and every CE is ln V."""

    def __init__(self, vocab=10, d=3):
        super().__init__()
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids, attention_mask=None, head=None):
        h = torch.zeros(*input_ids.shape, self.lm_head.in_features)
        return self.lm_head(h) if head is None else head(h, self.lm_head)


def hand_batch(pad_policy):
    # 2 x 6, prompt lengths 2 and 3, answer lengths 3 and 2 (then EOS padding); masked: row 0 {2, 4}, row 1 {3}
    ids = torch.tensor([[5, 6, 7, 8, 9, 0], [5, 6, 7, 8, 0, 0]])
    prompt, answer = torch.tensor([2, 3]), torch.tensor([3, 2])
    masked = torch.zeros(2, 6, dtype=torch.bool)
    masked[0, 2] = masked[0, 4] = masked[1, 3] = True
    noisy_ids = torch.where(masked, torch.full_like(ids, MASK), ids)
    response = response_mask(ids, prompt, answer, pad_policy)
    return NoisyBatch(noisy_ids, ids, masked, torch.tensor([0.5, 0.25]), response, None)


LNV = math.log(10)  # ZeroModel vocabulary 10: every CE is ln 10


@pytest.mark.parametrize("pad_policy,weighting,normalizer,expected_sum,expected_count", [
    ("supervise", "elbo", "sequence", LNV * (2 / (0.5 * 4) + 1 / (0.25 * 3)), 2),  # answer regions 4 and 3
    ("ignore", "elbo", "sequence", LNV * (2 / (0.5 * 3) + 1 / (0.25 * 2)), 2),  # answer lengths 3 and 2
    ("supervise", "none", "sequence", LNV * (2 / 4 + 1 / 3), 2),
    ("supervise", "elbo", "token", LNV * (2 / 0.5 + 1 / 0.25), 7),
    ("ignore", "elbo", "token", LNV * (2 / 0.5 + 1 / 0.25), 5),
    ("supervise", "none", "masked", LNV * 3, 3),
    ("supervise", "elbo", "masked", LNV * (2 / 0.5 + 1 / 0.25), 3),
])
def test_hand_computed_loss(pad_policy, weighting, normalizer, expected_sum, expected_count):
    cfg = DiffusionConfig(pad_policy=pad_policy, weighting=weighting, normalizer=normalizer, loss_chunk_size=2)
    noisy = hand_batch(pad_policy)
    model = ZeroModel()
    assert loss_sum(model, noisy, cfg).item() == pytest.approx(expected_sum, rel=1e-6)
    assert naive_loss_sum(model, noisy, cfg).item() == pytest.approx(expected_sum, rel=1e-6)
    assert normalizer_count(noisy, cfg) == expected_count


def test_default_loss_equals_reference_formula():
    # REFERENCE section 4: loss = 1/B sum_b 1/(L - P_b) sum_{i masked} CE_bi / p_b
    model, cfg = FakeLM(), DiffusionConfig(loss_chunk_size=5)
    batch = random_batch(B=5, L=14, seed=1)
    t = sample_times(5, "uniform", make_generator(0, 1))
    noisy = noise_batch(batch, t, cfg=cfg, mask_id=MASK, generator=make_generator(0, 1, 0, 0))
    assert noisy.masked.any()
    logits = model(noisy.noisy_ids)  # [B, L, V]
    p = (1 - 1e-3) * t + 1e-3
    reference = 0.0
    for b in range(5):
        ce = F.cross_entropy(logits[b].float(), batch.input_ids[b], reduction="none")  # [L]
        reference += (ce[noisy.masked[b]] / p[b]).sum() / (14 - batch.prompt_lengths[b])
    reference /= 5
    ours = loss_sum(model, noisy, cfg) / normalizer_count(noisy, cfg)
    assert ours.item() == pytest.approx(reference.item(), rel=1e-6)


@pytest.mark.parametrize("kwargs", [{}, {"complementary": True}, {"pad_policy": "ignore", "normalizer": "token"},
                                    {"weighting": "none", "normalizer": "masked", "complementary": True}])
def test_loss_sum_equals_naive_and_gradients_match(kwargs):
    cfg = DiffusionConfig(loss_chunk_size=3, **kwargs)
    batch = random_batch(B=3, L=10, seed=2)
    t = sample_times(3, "stratified", make_generator(5, 0))
    noisy = noise_batch(batch, t, cfg=cfg, mask_id=MASK, generator=make_generator(5, 0, 0, 0))
    grads = []
    for fn in (loss_sum, naive_loss_sum):
        model = FakeLM(seed=3)
        value = fn(model, noisy, cfg)
        value.backward()
        grads.append((value.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.allclose(grads[0][0], grads[1][0], rtol=1e-6)
    for a, b in zip(grads[0][1], grads[1][1]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------- noising


def test_mask_rate_matches_p():
    cfg = DiffusionConfig()
    L, draws = 40, 500
    batch = FakeBatch(torch.full((1, L), 7), torch.tensor([8]), torch.tensor([20]), torch.tensor([0]))
    for t in (0.1, 0.5, 0.9):
        masked = sum(int(noise_batch(batch, torch.tensor([t]), cfg=cfg, mask_id=MASK,
                                     generator=make_generator(1, i)).masked.sum()) for i in range(draws))
        n, p = draws * (L - 8), (1 - cfg.eps) * t + cfg.eps
        assert abs(masked / n - p) < 3 * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("kwargs", [{}, {"pad_policy": "ignore"}, {"complementary": True}])
def test_prompt_never_masked(kwargs):
    cfg = DiffusionConfig(**kwargs)
    for seed in range(200):
        batch = random_batch(B=3, L=10, seed=seed)
        t = sample_times(3, "uniform", make_generator(seed))
        noisy = noise_batch(batch, t, cfg=cfg, mask_id=MASK, generator=make_generator(seed, 1))
        prompt = torch.arange(10) < batch.prompt_lengths.repeat(noisy.masked.shape[0] // 3)[:, None]
        assert not (noisy.masked & prompt).any()
        assert (noisy.noisy_ids[prompt] == noisy.targets[prompt]).all()
        assert (noisy.masked <= noisy.response).all()
        assert ((noisy.noisy_ids == MASK) == noisy.masked).all()
        if cfg.pad_policy == "ignore":  # padding is never masked and hidden from attention
            pad = torch.arange(10) >= (batch.prompt_lengths + batch.answer_lengths)[:, None]
            assert not (noisy.masked & pad).any()
            if pad.any():
                assert (noisy.attention_mask == (~pad).long()).all()


@pytest.mark.parametrize("pad_policy", ["supervise", "ignore"])
def test_complementary_views_cover_response_once(pad_policy):
    cfg = DiffusionConfig(complementary=True, pad_policy=pad_policy)
    for seed in range(20):
        batch = random_batch(B=4, L=12, seed=seed)
        t = sample_times(4, "uniform", make_generator(seed))
        noisy = noise_batch(batch, t, cfg=cfg, mask_id=MASK, generator=make_generator(seed, 2))
        first, second = noisy.masked[:4], noisy.masked[4:]
        assert noisy.masked.shape == (8, 12)
        assert not (first & second).any()
        assert ((first | second) == noisy.response[:4]).all()
        assert torch.allclose(noisy.p[:4] + noisy.p[4:], torch.ones(4))
        assert (noisy.p >= cfg.eps - 1e-7).all() and (noisy.p <= 1 - cfg.eps + 1e-7).all()
        assert (noisy.targets[4:] == batch.input_ids).all()


def test_stratified_levels_evenly_spread_and_sliced():
    N = 24
    full = sample_times(N, "stratified", make_generator(3, 7))
    gaps = full.double().sort().values.diff()
    assert torch.allclose(gaps, torch.full_like(gaps, 1 / N), atol=1e-6)
    assert 0 <= full.min() < 1 / N and full.max() < 1
    # 2 ranks x 3 micro-steps of 4 each: the slices of fresh, identical generators rebuild the full set
    for scheme in ("stratified", "uniform"):
        whole = sample_times(N, scheme, make_generator(3, 7))
        parts = [sample_times(4, scheme, make_generator(3, 7), global_size=N, global_offset=o) for o in range(0, N, 4)]
        assert torch.equal(torch.cat(parts), whole)
    assert not torch.equal(sample_times(N, "stratified", make_generator(3, 8)), full)
    with pytest.raises(ValueError):
        sample_times(4, "stratified", make_generator(0), global_size=6, global_offset=4)


def test_make_generator_and_config_validation():
    a = torch.rand(3, generator=make_generator(1, 2, 3))
    assert torch.equal(a, torch.rand(3, generator=make_generator(1, 2, 3)))
    assert not torch.equal(a, torch.rand(3, generator=make_generator(1, 3, 2)))
    with pytest.raises(ValueError, match="diffusion.normalizer"):
        DiffusionConfig(normalizer="tokens")


# ---------------------------------------------------------------------------------------------- chunked CE


class LoRAHead(nn.Module):  # stands for lora.LoRALinear: not an nn.Linear, has lora_A
    def __init__(self, base: nn.Linear):
        super().__init__()
        self.weight = base.weight
        self.lora_A, self.lora_B = nn.Linear(base.in_features, 2, bias=False), nn.Linear(2, base.out_features, bias=False)
        nn.init.normal_(self.lora_B.weight)

    def forward(self, x):
        return F.linear(x, self.weight) + self.lora_B(self.lora_A(x))


def reference_ce(hidden, head, targets, weights):
    return (F.cross_entropy(head(hidden).float(), targets, reduction="none") * weights).sum()


@pytest.mark.parametrize("N", [0, 1, 7, 20])
@pytest.mark.parametrize("chunk", [3, 7, 64])
@pytest.mark.parametrize("lora", [False, True])
def test_chunked_cross_entropy_matches_full_logits(N, chunk, lora):
    torch.manual_seed(N * 100 + chunk)
    base = nn.Linear(8, 16, bias=False)
    head = LoRAHead(base) if lora else base
    hidden0 = torch.randn(N, 8)
    targets, weights = torch.randint(0, 16, (N,)), torch.rand(N) + 0.5
    results = []
    for fn in (chunked_linear_cross_entropy, reference_ce):
        hidden = hidden0.clone().requires_grad_()
        head.zero_grad(set_to_none=True)
        loss = fn(hidden, head, targets, weights, chunk) if fn is chunked_linear_cross_entropy else fn(
            hidden, head, targets, weights)
        (2.5 * loss).backward()
        results.append((loss.detach(), hidden.grad, [p.grad for p in head.parameters()]))
    (l1, gh1, gp1), (l2, gh2, gp2) = results
    assert l1.dtype == torch.float32
    assert torch.allclose(l1, l2, rtol=1e-6, atol=1e-6)
    assert torch.allclose(gh1, gh2, rtol=1e-5, atol=1e-6)
    for a, b in zip(gp1, gp2):
        assert (a is None and b is None) or torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    if N == 0:
        assert l1.item() == 0 and all(g is None or not g.any() for g in gp1)


def test_chunked_cross_entropy_frozen_head_and_no_grad():
    head = nn.Linear(8, 16, bias=False).requires_grad_(False)
    hidden = torch.randn(9, 8, requires_grad=True)
    targets, weights = torch.randint(0, 16, (9,)), torch.ones(9)
    chunked_linear_cross_entropy(hidden, head, targets, weights, 4).backward()
    assert head.weight.grad is None and hidden.grad is not None
    with torch.no_grad():
        value = chunked_linear_cross_entropy(hidden, head, targets, weights, 4)
    assert torch.allclose(value, reference_ce(hidden, head, targets, weights))


def test_chunked_cross_entropy_under_bf16_autocast():
    torch.manual_seed(0)
    head = nn.Linear(32, 64, bias=False)
    hidden = torch.randn(20, 32, requires_grad=True)
    targets, weights = torch.randint(0, 64, (20,)), torch.rand(20)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = chunked_linear_cross_entropy(hidden, head, targets, weights, 6)
    loss.backward()
    assert loss.dtype == torch.float32 and hidden.grad.dtype == torch.float32 and head.weight.grad.dtype == torch.float32
    gh, gw = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = reference_ce(hidden, head, targets, weights)
    ref.backward()
    assert torch.allclose(loss, ref, rtol=1e-2)
    assert torch.allclose(gh, hidden.grad, rtol=5e-2, atol=5e-3)
    assert torch.allclose(gw, head.weight.grad, rtol=5e-2, atol=5e-3)


# ---------------------------------------------------------------------------------------------- validation


def test_validation_deterministic_stderr_shrinks_and_rank_split_invariant():
    model = FakeLM(seed=4).train()
    data = [random_batch(B=4, L=12, seed=s, first_index=4 * s) for s in range(3)]  # 12 sequences
    a = validation_nelbo(model, data, mask_id=MASK, draws=4, seed=1)
    b = validation_nelbo(model, data, mask_id=MASK, draws=4, seed=1)
    assert a == b and model.training
    assert math.isfinite(a[0]) and a[0] > 0 and a[1] > 0
    many = validation_nelbo(model, data, mask_id=MASK, draws=32, seed=1)
    assert many[1] < a[1] / 2
    assert abs(many[0] - a[0]) < 4 * a[1]
    assert validation_nelbo(model, data, mask_id=MASK, draws=4, seed=2) != a

    # 2 simulated ranks, each with its own share re-batched and padded to its own length
    rows = [(b.input_ids[i], int(b.prompt_lengths[i]), int(b.answer_lengths[i]), int(b.indices[i]))
            for b in data for i in range(4)]
    rank_sums = []
    for rank in range(2):
        mine = rows[rank::2]
        L = max(p + n for _, p, n, _ in mine) + rank  # rank 1 keeps one extra column of padding
        ids = torch.zeros(len(mine), L, dtype=torch.long)
        for i, (x, p, n, _) in enumerate(mine):
            ids[i, :p + n] = x[:p + n]
        batch = FakeBatch(ids, torch.tensor([r[1] for r in mine]), torch.tensor([r[2] for r in mine]),
                          torch.tensor([r[3] for r in mine]))
        halves = [FakeBatch(ids[s], batch.prompt_lengths[s], batch.answer_lengths[s], batch.indices[s])
                  for s in (slice(0, 2), slice(2, None))]
        rank_sums.append(validation_sums(model, halves, mask_id=MASK, draws=4, seed=1))
    split = finish_validation(rank_sums[0] + rank_sums[1], 4)
    assert split[0] == pytest.approx(a[0], rel=1e-9) and split[1] == pytest.approx(a[1], rel=1e-9)


# ---------------------------------------------------------------------------------------------- sampler


class ScriptedModel(nn.Module):
    """Returns fixed logits: table(call, input_ids) -> [L, V] or [B, L, V]; records every input."""

    def __init__(self, table):
        super().__init__()
        self.table, self.calls = table, []

    def forward(self, input_ids, attention_mask=None, head=None):
        self.calls.append(input_ids.clone())
        logits = self.table(len(self.calls) - 1, input_ids).float().expand(input_ids.shape[0], -1, -1).clone()
        return logits if head is None else head(logits, nn.Identity())


def peaked(L, V, token, score):
    """[L, V] logits: position i predicts token[i] with logit score[i] (others 0), so higher score = surer."""
    logits = torch.zeros(L, V)
    logits[torch.arange(L), torch.as_tensor(token)] = torch.as_tensor(score, dtype=torch.float)
    return logits


def test_num_transfer_tokens_schedule():
    masked = torch.zeros(2, 12, dtype=torch.bool)
    masked[0, :10] = True
    masked[1, :3] = True
    assert num_transfer_tokens(masked, 4).tolist() == [[3, 3, 2, 2], [1, 1, 1, 0]]


def test_commit_order_follows_confidence_and_schedule():
    P, G, V = 2, 6, 10
    scores = [3.0, 9.0, 1.0, 7.0, 5.0, 2.0]
    table = peaked(P + G, V, [0, 0, 4, 5, 6, 7, 8, 9], [0, 0] + scores)
    model = ScriptedModel(lambda call, ids: table)
    out = generate(model, torch.tensor([[1, 2]]), steps=4, gen_length=G, block_length=G, mask_id=MASK)
    assert out.tolist() == [[1, 2, 4, 5, 6, 7, 8, 9]]
    inputs = model.calls + [out]
    committed = [int((x[0, P:] != MASK).sum()) for x in inputs]
    assert committed == [0, 2, 4, 5, 6]  # m = 6 over s = 4 steps: 2, 2, 1, 1
    order = [set((inputs[i + 1][0, P:] != MASK).nonzero()[:, 0].tolist()) -
             set((inputs[i][0, P:] != MASK).nonzero()[:, 0].tolist()) for i in range(4)]
    assert order == [{1, 3}, {4, 0}, {5}, {2}]  # by descending score 9, 7, 5, 3, 2, 1


def test_nothing_past_current_block_and_committed_tokens_never_change():
    P, G, V = 1, 8, 12
    # Later positions are the most confident, and every call predicts different tokens.
    model = ScriptedModel(lambda call, ids: peaked(P + G, V, [(call + i) % 8 + 4 for i in range(P + G)],
                                                   [float(i) for i in range(P + G)]))
    out = generate(model, torch.tensor([[1]]), steps=4, gen_length=G, block_length=4, mask_id=MASK)
    for x in model.calls[:2]:  # block 1 is decoded by the first two calls
        assert (x[0, P + 4:] == MASK).all()
    assert (model.calls[2][0, P:P + 4] != MASK).all()
    history = model.calls + [out]
    for before, after in zip(history, history[1:]):
        done = before != MASK
        assert torch.equal(before[done], after[done])
    assert (out != MASK).all()


def test_cfg_combines_logits():
    P, G, V, scale = 2, 2, 6, 1.5
    cond = torch.tensor([[0.0, 0, 0, 0, 2.0, 1.9]]).repeat(P + G, 1)
    uncond = torch.tensor([[0.0, 0, 0, 0, 3.0, 1.0]]).repeat(P + G, 1)
    model = ScriptedModel(lambda call, ids: torch.stack([uncond if (row[:P] == MASK).all() else cond for row in ids]))
    out = generate(model, torch.tensor([[1, 2]]), steps=2, gen_length=G, block_length=G, cfg_scale=scale, mask_id=MASK)
    combined = uncond + (scale + 1) * (cond - uncond)  # token 5: 1 + 2.5 * 0.9 > token 4: 3 - 2.5
    assert combined[0].argmax() == 5 and cond[0].argmax() == 4 and uncond[0].argmax() == 4
    assert out[0, P:].tolist() == [5, 5]
    first = model.calls[0]
    assert first.shape[0] == 2 and (first[1, :P] == MASK).all() and first[0, :P].tolist() == [1, 2]


def test_temperature_zero_deterministic_and_sampling_reproducible():
    model = FakeLM(seed=5)
    prompt = torch.tensor([[4, 5, 6], [7, 8, 9]])
    kw = dict(steps=4, gen_length=8, block_length=4, mask_id=MASK)
    assert torch.equal(generate(model, prompt, **kw), generate(model, prompt, **kw))
    hot = [generate(model, prompt, temperature=1.0, generator=make_generator(s), **kw) for s in (0, 0, 1)]
    assert torch.equal(hot[0], hot[1]) and not torch.equal(hot[0], hot[2])
    rand = generate(model, prompt, remasking="random", generator=make_generator(0), **kw)
    assert rand.shape == (2, 11) and (rand != MASK).all()
    with pytest.raises(ValueError):
        generate(model, prompt, steps=3, gen_length=8, block_length=4, mask_id=MASK)


def test_eos_options():
    P, G, V, EOS, EOT = 1, 6, 10, 0, 1
    # EOS is the most likely token everywhere, and most confident at positions 0 and 1.
    table = torch.zeros(P + G, V)
    table[:, EOS] = torch.tensor([0, 9.0, 8.0, 3.0, 3.0, 3.0, 3.0])
    table[:, 5] = 2.0
    model = ScriptedModel(lambda call, ids: table)
    plain = generate(model, torch.tensor([[2]]), steps=6, gen_length=G, block_length=G, mask_id=MASK)
    assert (plain[0, P:] == EOS).all()
    suppressed = generate(model, torch.tensor([[2]]), steps=6, gen_length=G, block_length=G, mask_id=MASK,
                          suppress_ids=(EOS,))
    assert (suppressed[0, P:] == 5).all()
    table2 = table.clone()
    table2[3:5, EOS] = 0.0  # positions 2 and 3 now predict token 5, less confidently than the EOS positions
    model = ScriptedModel(lambda call, ids: table2)
    last = generate(model, torch.tensor([[2]]), steps=6, gen_length=G, block_length=G, mask_id=MASK,
                    last_ids=(EOS, EOT))
    # the two non-EOS positions go first although the EOS positions are more confident
    assert (model.calls[1][0, P:] != MASK).nonzero()[:, 0].tolist() in ([2], [3])
    assert (model.calls[2][0, P:] != MASK).nonzero()[:, 0].tolist() == [2, 3]
    assert (model.calls[3][0, P:] != MASK).nonzero()[:, 0].tolist() == [0, 2, 3]  # then EOS by confidence
    assert (last != MASK).all() and last[0, P:].tolist() == [EOS, EOS, 5, 5, EOS, EOS]


def test_left_padded_batch_equals_single_prompts():
    model = FakeLM(seed=6)
    kw = dict(steps=4, gen_length=8, block_length=4, mask_id=MASK)
    short, long = torch.tensor([[5, 6]]), torch.tensor([[7, 8, 9, 10]])
    batch = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    out = generate(model, batch, attention_mask=mask, **kw)
    assert torch.equal(out[0, 2:], generate(model, short, **kw)[0])
    assert torch.equal(out[1], generate(model, long, **kw)[0])


# ---------------------------------------------------------------------------------------------- with model.py


def test_with_llada_model_loss_and_validation():
    model_py = pytest.importorskip("model")
    config = model_py.LLaDAConfig.from_name("tiny", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2,
                                            mlp_hidden_size=96, vocab_size=40, mask_token_id=MASK)
    model = model_py.LLaDA.from_config(config, seed=0)
    batch = random_batch(B=3, L=16, vocab=40, seed=7)
    for cfg in (DiffusionConfig(loss_chunk_size=4), DiffusionConfig(pad_policy="ignore", complementary=True)):
        noisy = noise_batch(batch, sample_times(3, "uniform", make_generator(1)), cfg=cfg, mask_id=MASK,
                            generator=make_generator(1, 0))
        values = []
        for fn in (loss_sum, naive_loss_sum):
            model.zero_grad()
            value = fn(model, noisy, cfg)
            value.backward()
            values.append((value.detach(), model.model.transformer.blocks[0].q_proj.weight.grad.clone(),
                           model.model.transformer.ff_out.weight.grad.clone()))
        for a, b in zip(*values):
            assert (a - b).abs().max() <= 1e-5 * b.abs().max(), (a - b).abs().max() / b.abs().max()
    # validation: extra padding columns and a filler row (index -1) change nothing
    whole = validation_sums(model, [batch], mask_id=MASK, draws=3, seed=0)
    padded_ids = torch.cat([batch.input_ids, torch.zeros(3, 5, dtype=torch.long)], 1)
    filler = FakeBatch(padded_ids[:1], batch.prompt_lengths[:1], batch.answer_lengths[:1], torch.tensor([-1]))
    padded = FakeBatch(padded_ids, batch.prompt_lengths, batch.answer_lengths, batch.indices)
    again = validation_sums(model, [padded, filler], mask_id=MASK, draws=3, seed=0)
    assert torch.allclose(whole, again, rtol=1e-5)
