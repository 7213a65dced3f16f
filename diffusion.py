"""The masked-diffusion maths: forward noising, the SFT loss, validation likelihood and the sampler.

Plain functions over tensors; the model only provides `forward(input_ids, attention_mask, head)`.
With the defaults everything equals the official LLaDA recipe (GUIDELINES.md and generate.py):

    t_b ~ U(0, 1),  p_b = (1 - eps) t_b + eps,  response positions masked with probability p_b,
    loss = 1/B * sum_b 1/(L - P_b) * sum_{i masked} CE(x_bi) / p_b

The trainer calls, per micro-batch: `t = sample_times(...)`, `noisy = noise_batch(batch, t, ...)`,
`loss_sum(model, noisy, cfg)`, and divides by the all-reduced sum of `normalizer_count(noisy, cfg)`.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

if TYPE_CHECKING:  # data.py imports nothing from here; the Batch fields used are listed in noise_batch
    from data import Batch


@dataclass
class DiffusionConfig:
    eps: float = 1e-3  # smallest mask probability: p = (1 - eps) t + eps keeps the 1/p weight <= 1/eps
    time_sampling: str = "uniform"  # "uniform": iid t ~ U(0,1) (official) | "stratified": evenly spaced over the step
    stratified_shuffle: bool = True  # stratified: shuffle the levels so a level is not tied to a batch slot
    complementary: bool = False  # also train each sequence on the complement of its mask (2x rows, lower variance)
    pad_policy: str = "supervise"  # "supervise": EOS padding is maskable and scored (official) | "ignore": hidden, unscored
    weighting: str = "elbo"  # "elbo": weight 1/p per masked token (official) | "none": plain cross-entropy
    normalizer: str = "sequence"  # "sequence": per-sequence sum / answer length, mean over sequences (official)
    #                               "token": / response tokens in the step | "masked": / masked tokens in the step
    loss_chunk_size: int = 512  # masked positions per LM-head + CE chunk: 512 x 126464 x 4 B = 259 MB of fp32 logits
    eval_draws: int = 8  # validation: stratified masked-count draws per sequence
    eval_seed: int = 0  # validation: seed of the masks, fixed so every evaluation scores the same noise

    def __post_init__(self) -> None:
        choices = {"time_sampling": ("uniform", "stratified"), "pad_policy": ("supervise", "ignore"),
                   "weighting": ("elbo", "none"), "normalizer": ("sequence", "token", "masked")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"diffusion.{key} = {getattr(self, key)!r}: expected one of {', '.join(allowed)}")
        if not 0.0 < self.eps < 0.5:
            raise ValueError(f"diffusion.eps = {self.eps}: expected 0 < eps < 0.5")
        if self.loss_chunk_size < 1 or self.eval_draws < 1:
            raise ValueError("diffusion.loss_chunk_size and diffusion.eval_draws must be >= 1")


def make_generator(seed: int, *ints: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator seeded by hashing (seed, *ints): e.g. (seed, step) or (seed, step, rank, micro_step)."""
    digest = hashlib.sha256(repr((seed, *ints)).encode()).digest()
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return generator


# ----------------------------------------------------------------------------------------------
# Forward process


def sample_times(n: int, scheme: str, generator: torch.Generator, *, global_size: int | None = None,
                 global_offset: int = 0, shuffle: bool = True) -> torch.Tensor:
    """Diffusion times in [0, 1) for `n` sequences: slice [global_offset, global_offset + n) of the step's N.

    N = global_size is the whole optimizer step (all micro-batches of all ranks). `generator` must be
    identical on every rank and fresh for each call (seed it from (seed, step)): every caller draws the
    same N values and takes its own slice, so t of a sample does not depend on how the step is split.
    "stratified": one shared offset u, levels (u + i) / N, i = 0..N-1 (optionally shuffled).
    """
    total = n if global_size is None else global_size
    if global_offset < 0 or global_offset + n > total:
        raise ValueError(f"sample_times: slice [{global_offset}, {global_offset + n}) outside global size {total}")
    if scheme == "uniform":
        t = torch.rand(total, generator=generator, dtype=torch.float64)
    elif scheme == "stratified":
        u = torch.rand((), generator=generator, dtype=torch.float64)
        t = (u + torch.arange(total, dtype=torch.float64)) / total
        if shuffle:
            t = t[torch.randperm(total, generator=generator)]
    else:
        raise ValueError(f"diffusion.time_sampling = {scheme!r}: expected uniform or stratified")
    return t[global_offset:global_offset + n].float()  # [n]


@dataclass
class NoisyBatch:
    noisy_ids: torch.Tensor  # [B', L] long: input with masked positions replaced by mask_id
    targets: torch.Tensor  # [B', L] long: the clean tokens
    masked: torch.Tensor  # [B', L] bool: positions replaced by the mask token (the scored ones)
    p: torch.Tensor  # [B'] float: mask probability of each row (its 1/p is the ELBO weight)
    response: torch.Tensor  # [B', L] bool: maskable, countable positions (the answer region)
    attention_mask: torch.Tensor | None  # [B', L] long, 0 hides padding (pad_policy "ignore"); None = attend all


def response_mask(input_ids: torch.Tensor, prompt_lengths: torch.Tensor, answer_lengths: torch.Tensor,
                  pad_policy: str) -> torch.Tensor:
    """[B, L] bool: the answer region. "supervise": every position >= P; "ignore": P <= i < P + answer_len."""
    pos = torch.arange(input_ids.shape[1], device=input_ids.device)  # [L]
    region = pos >= prompt_lengths[:, None]  # [B, L]
    if pad_policy == "ignore":
        region &= pos < (prompt_lengths + answer_lengths)[:, None]
    return region


def padding_attention_mask(input_ids: torch.Tensor, real_lengths: torch.Tensor) -> torch.Tensor | None:
    """[B, L] long, 1 on the first real_lengths[b] positions; None when no row has padding (fast SDPA path)."""
    if bool((real_lengths >= input_ids.shape[1]).all()):
        return None
    pos = torch.arange(input_ids.shape[1], device=input_ids.device)
    return (pos < real_lengths[:, None]).long()


def noise_batch(batch: "Batch", t: torch.Tensor, *, cfg: DiffusionConfig, mask_id: int,
                generator: torch.Generator) -> NoisyBatch:
    """Mask each answer-region position independently with probability p(t); the prompt is never masked.

    Uses batch.input_ids [B, L], batch.prompt_lengths [B], batch.answer_lengths [B]. The generator should
    be seeded per (seed, step, rank, micro_step). With cfg.complementary the result has 2B rows: the second
    copy masks exactly the answer positions the first left clean. Its mask rate is 1 - p, so both views
    keep the exact 1/p weight only if 1 - p >= eps too: complementary mode therefore uses
    p = eps + (1 - 2 eps) t, symmetric in [eps, 1 - eps], and the two views have the same distribution.
    """
    ids = batch.input_ids  # [B, L]
    t = t.to(device=ids.device, dtype=torch.float32)
    if cfg.complementary:
        p = cfg.eps + (1 - 2 * cfg.eps) * t  # [B]
    else:
        p = (1 - cfg.eps) * t + cfg.eps  # [B]
    response = response_mask(ids, batch.prompt_lengths, batch.answer_lengths, cfg.pad_policy)  # [B, L]
    # Draw on the generator's device (usually CPU) so the masks do not depend on where training runs.
    u = torch.rand(ids.shape, generator=generator, device=generator.device).to(ids.device)  # [B, L]
    masked = (u < p[:, None]) & response  # [B, L]
    attention_mask = None
    if cfg.pad_policy == "ignore":
        attention_mask = padding_attention_mask(ids, batch.prompt_lengths + batch.answer_lengths)
    if cfg.complementary:
        masked = torch.cat([masked, response & ~masked])
        p = torch.cat([p, 1 - p])
        ids, response = ids.repeat(2, 1), response.repeat(2, 1)
        attention_mask = None if attention_mask is None else attention_mask.repeat(2, 1)
    noisy_ids = torch.where(masked, torch.full_like(ids, mask_id), ids)
    return NoisyBatch(noisy_ids, ids, masked, p, response, attention_mask)


# ----------------------------------------------------------------------------------------------
# The training loss


def token_weights(noisy: NoisyBatch, cfg: DiffusionConfig) -> torch.Tensor:
    """[B'] float32 weight of every masked token of each row: 1/p (elbo) times 1/answer length (sequence)."""
    w = torch.ones_like(noisy.p, dtype=torch.float32)
    if cfg.weighting == "elbo":
        w = w / noisy.p.float()
    if cfg.normalizer == "sequence":
        # Rows with an empty answer region have no masked token; clamp only avoids 0/0.
        w = w / noisy.response.sum(1).clamp(min=1).float()
    return w


def normalizer_count(noisy: NoisyBatch, cfg: DiffusionConfig) -> float:
    """This micro-batch's share of the optimizer step's loss denominator (sum it over micro-batches and ranks)."""
    if cfg.normalizer == "sequence":
        return float(noisy.noisy_ids.shape[0])
    if cfg.normalizer == "token":
        return float(noisy.response.sum())
    return float(noisy.masked.sum())


def loss_sum(model: nn.Module, noisy: NoisyBatch, cfg: DiffusionConfig) -> torch.Tensor:
    """sum_i w_i CE_i over the masked positions, float32, not yet divided by the step's denominator.

    The LM head runs inside the model's forward (FSDP unshards it only there) on the gathered masked hidden
    states, in chunks: no [B, L, V] logits tensor is ever built.
    """
    weights = token_weights(noisy, cfg)[:, None].expand_as(noisy.masked)[noisy.masked]  # [N]
    targets = noisy.targets[noisy.masked]  # [N]

    def head(h: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:  # h [B', L, d]
        return chunked_linear_cross_entropy(h[noisy.masked], lm_head, targets, weights, cfg.loss_chunk_size)

    return model(noisy.noisy_ids, attention_mask=noisy.attention_mask, head=head)


def naive_loss_sum(model: nn.Module, noisy: NoisyBatch, cfg: DiffusionConfig) -> torch.Tensor:
    """The same value as loss_sum, computed as dLLM-Factory does: full [B, L, V] logits, then masked CE.

    Kept for the benchmark's --compare and as a readable reference of what loss_sum computes.
    """
    logits = model(noisy.noisy_ids, attention_mask=noisy.attention_mask)  # [B', L, V]
    ce = F.cross_entropy(logits[noisy.masked].float(), noisy.targets[noisy.masked], reduction="none")  # [N]
    weights = token_weights(noisy, cfg)[:, None].expand_as(noisy.masked)[noisy.masked]  # [N]
    return (ce * weights).sum()


def chunked_linear_cross_entropy(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor,
                                 weights: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """sum_i weights_i * CE(head(hidden_i), targets_i), float32, over chunks of `chunk_size` rows.

    hidden [N, d], targets [N], weights [N]. A plain bias-free nn.Linear head takes the fused path (logits,
    loss and gradients computed chunk by chunk during forward, nothing of size vocab kept); any other head
    (LoRA-wrapped) is checkpointed per chunk, so backward recomputes one chunk's logits at a time.
    """
    fused = isinstance(head, nn.Linear) and head.bias is None and not hasattr(head, "lora_A")
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    if fused and needs_grad:
        return _FusedLinearCrossEntropy.apply(hidden, head.weight, targets, weights, chunk_size)
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, max(hidden.shape[0], 1), chunk_size):  # N = 0 still runs the head: zero grads, not None
        args = (hidden[s:s + chunk_size], head, targets[s:s + chunk_size], weights[s:s + chunk_size])
        total = total + (checkpoint(_chunk_loss, *args, use_reentrant=False) if needs_grad else _chunk_loss(*args))
    return total


def _chunk_loss(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()  # [n, V]
    return (F.cross_entropy(logits, targets, reduction="none") * weights.float()).sum()


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Liger-style fused head + CE: backward only rescales the gradients that forward already computed.

    Per chunk: logits in the compute dtype (the autocast dtype if autocast is on), upcast to float32 for the
    softmax; dCE/dlogits = w (softmax - onehot) is formed in place, cast back, and multiplied into
    d hidden (hidden's dtype) and d weight (accumulated in float32, returned in the weight's dtype).
    The head matmul is never recomputed and no chunk's logits outlive the loop.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                chunk_size: int) -> torch.Tensor:
        device_type = hidden.device.type
        autocast = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast else hidden.dtype
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        h, w = hidden.to(dtype), weight.to(dtype)  # [N, d], [V, d]
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None  # [N, d]
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        with torch.autocast(device_type, enabled=False):  # dtypes are explicit below
            for s in range(0, hidden.shape[0], chunk_size):
                h_c, t_c, w_c = h[s:s + chunk_size], targets[s:s + chunk_size], weights[s:s + chunk_size].float()
                logits = (h_c @ w.T).float()  # [n, V] float32
                target_logit = logits.gather(1, t_c[:, None]).squeeze(1)  # [n]
                # logsumexp in place: torch.logsumexp would allocate a second [n, V] buffer
                m = logits.amax(dim=-1, keepdim=True)  # [n, 1]
                sumexp = logits.sub_(m).exp_().sum(dim=-1, keepdim=True)  # [n, 1]; logits now exp(x - m)
                lse = (m + sumexp.log()).squeeze(1)  # [n]
                loss += ((lse - target_logit) * w_c).sum()
                grad_logits = logits.div_(sumexp)  # softmax, in place of the logits
                grad_logits.scatter_add_(1, t_c[:, None], -torch.ones_like(grad_logits[:, :1]))
                grad_logits = grad_logits.mul_(w_c[:, None]).to(dtype)  # [n, V]
                if need_hidden:
                    grad_hidden[s:s + chunk_size] = grad_logits @ w
                if need_weight:
                    if dtype == torch.float32:
                        grad_weight.addmm_(grad_logits.T, h_c)  # in place: no [V, d] temporary
                    else:
                        grad_weight += (grad_logits.T @ h_c).float()
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        ctx.grads = (grad_hidden, grad_weight)  # intermediates, not inputs: scaled in place in backward
        return loss

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.grads
        del ctx.grads
        if grad_hidden is not None:
            grad_hidden.mul_(grad_output.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight.mul_(grad_output.to(grad_weight.dtype))
        return grad_hidden, grad_weight, None, None, None


# ----------------------------------------------------------------------------------------------
# Validation: negative ELBO in nats per answer token


@torch.no_grad()
def validation_sums(model: nn.Module, batches: Iterable["Batch"], *, mask_id: int, draws: int, seed: int,
                    chunk_size: int = 1024) -> torch.Tensor:
    """This process's [sum_j NELBO_j, sum_j T_j, sum_j Var(NELBO_j estimate)] in float64, for validation_nelbo.

    LLaDA's likelihood scheme: per sequence j with answer length T_j, `draws` masked counts
    k_d = ((k0 + d T / draws - 1) mod T) + 1 from one random k0 in 1..T, each draw masking a random
    subset of k_d answer tokens; estimate T/k_d * sum CE over them. All randomness of sequence j comes
    from a generator seeded by (seed, global index of j), so any split of the data gives the same values.
    Only the real answer (answer_lengths, incl. end-of-turn) is scored and padding is hidden by the
    attention mask: the number does not depend on batching or on the training pad policy.
    """
    sums = torch.zeros(3, dtype=torch.float64)
    for batch in batches:
        ids = batch.input_ids  # [B, L]
        B, L = ids.shape
        answer = response_mask(ids, batch.prompt_lengths, batch.answer_lengths, "ignore")  # [B, L]
        attention_mask = padding_attention_mask(ids, batch.prompt_lengths + batch.answer_lengths)
        # indices -1 mark filler rows (ranks kept in step by data.eval_batches): scored as empty answers
        lengths = [int(n) if int(i) >= 0 else 0 for n, i in zip(batch.answer_lengths, batch.indices)]
        masks = torch.zeros(draws, B, L, dtype=torch.bool)  # [D, B, L]
        counts = torch.ones(draws, B, dtype=torch.float64)  # [D, B]
        for b, T in enumerate(lengths):
            if T == 0:
                continue
            g = make_generator(seed, int(batch.indices[b]))
            k0 = int(torch.randint(1, T + 1, (), generator=g))
            k = ((torch.round(k0 + torch.arange(draws, dtype=torch.float64) * T / draws).long() - 1) % T) + 1
            start = int(batch.prompt_lengths[b])
            for d in range(draws):
                chosen = torch.randperm(T, generator=g)[: int(k[d])]
                masks[d, b, start + chosen] = True
            counts[:, b] = k.double()
        estimates = torch.zeros(draws, B, dtype=torch.float64)  # [D, B] NELBO estimate of each sequence
        for d in range(draws):
            masked = masks[d].to(ids.device) & answer  # [B, L]
            noisy = torch.where(masked, torch.full_like(ids, mask_id), ids)
            rows = masked.nonzero()[:, 0]  # [N] row of each masked position

            def head(h: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:  # h [B, L, d] -> CE [N]
                return _token_cross_entropy(h[masked], lm_head, ids[masked], chunk_size)

            ce = model(noisy, attention_mask=attention_mask, head=head).double()  # [N]
            per_row = torch.zeros(B, dtype=torch.float64, device=ce.device).index_add_(0, rows, ce).cpu()
            estimates[d] = per_row * torch.tensor(lengths, dtype=torch.float64) / counts[d]
        sums[0] += estimates.mean(0).sum()
        sums[1] += sum(lengths)
        if draws > 1:
            sums[2] += (estimates.var(0) / draws).sum()
    return sums


def finish_validation(sums: torch.Tensor, draws: int) -> tuple[float, float]:
    """(nats per answer token, its Monte Carlo standard error) from summed validation_sums."""
    tokens = max(float(sums[1]), 1.0)
    stderr = math.sqrt(float(sums[2])) / tokens if draws > 1 else float("nan")
    return float(sums[0]) / tokens, stderr


def validation_nelbo(model: nn.Module, batches: Iterable["Batch"], *, mask_id: int, draws: int = 8, seed: int = 0,
                     chunk_size: int = 1024) -> tuple[float, float]:
    """Deterministic negative ELBO in nats per answer token and its standard error (see validation_sums).

    Under torch.distributed each rank passes its own share of the data; the sums are all-reduced so every
    rank returns the same number. The model is put in eval mode for the pass and restored afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        sums = validation_sums(model, batches, mask_id=mask_id, draws=draws, seed=seed, chunk_size=chunk_size)
    finally:
        model.train(was_training)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
        sums = sums.to(device)
        torch.distributed.all_reduce(sums)
        sums = sums.cpu()
    return finish_validation(sums, draws)


def _token_cross_entropy(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """[N] float32 CE of head(hidden) per row, chunked (no-grad evaluation path)."""
    pieces = [F.cross_entropy(head(hidden[s:s + chunk_size]).float(), targets[s:s + chunk_size], reduction="none")
              for s in range(0, hidden.shape[0], chunk_size)]
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# The sampler (LLaDA generate.py semantics)


def add_gumbel_noise(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Official Gumbel-max in float64: exp(logits) / (-log U)^temperature; temperature 0 returns the logits.

    float64 because low-precision Gumbel noise measurably hurts sample quality (LLaDA's note).
    """
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    device = generator.device if generator is not None else logits.device
    noise = torch.rand(logits.shape, generator=generator, dtype=torch.float64, device=device).to(logits.device)
    return logits.exp() / (-torch.log(noise)) ** temperature


def num_transfer_tokens(masked: torch.Tensor, steps: int) -> torch.Tensor:
    """[B, steps] tokens to commit per step: m // steps each, the first m % steps steps one more."""
    m = masked.sum(dim=1, keepdim=True)  # [B, 1]
    schedule = (m // steps).repeat(1, steps)  # [B, steps]
    schedule += torch.arange(steps, device=masked.device)[None, :] < (m % steps)
    return schedule


@torch.no_grad()
def generate(model: nn.Module, prompt: torch.Tensor, *, steps: int, gen_length: int, block_length: int,
             temperature: float = 0.0, cfg_scale: float = 0.0, remasking: str = "low_confidence", mask_id: int,
             attention_mask: torch.Tensor | None = None, suppress_ids: Sequence[int] = (),
             last_ids: Sequence[int] = (), generator: torch.Generator | None = None) -> torch.Tensor:
    """Semi-autoregressive masked-diffusion sampling; returns [B, P + gen_length] token ids.

    prompt [B, P], left-padded when lengths differ, with attention_mask [B, P] (1 = real token); generated
    positions always attend. Official options: suppress_ids=(EOS,) is `logits_eos_inf` (those tokens are
    never generated); last_ids=(EOS, EOT) is `confidence_eos_eot_inf` (positions predicting them are
    committed only once no other masked position of the block remains). Logits are computed only for the
    generated part; confidences use float32 softmax.
    """
    if gen_length % block_length != 0:
        raise ValueError(f"gen_length {gen_length} is not a multiple of block_length {block_length}")
    num_blocks = gen_length // block_length
    if steps % num_blocks != 0:
        raise ValueError(f"steps {steps} is not a multiple of the number of blocks {num_blocks}")
    if remasking not in ("low_confidence", "random"):
        raise ValueError(f"remasking = {remasking!r}: expected low_confidence or random")
    steps_per_block = steps // num_blocks
    B, P = prompt.shape
    x = torch.full((B, P + gen_length), mask_id, dtype=torch.long, device=prompt.device)  # [B, P + G]
    x[:, :P] = prompt
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, gen_length)], dim=1)
    head = lambda h, lm_head: lm_head(h[:, P:])  # noqa: E731  logits of the generated part only [B, G, V]

    for block in range(num_blocks):
        block_end = block * block_length + block_length  # in generated coordinates
        schedule = num_transfer_tokens(x[:, P + block_end - block_length:P + block_end] == mask_id, steps_per_block)
        for step in range(steps_per_block):
            masked = x[:, P:] == mask_id  # [B, G]
            if cfg_scale > 0:
                unconditional = x.clone()
                unconditional[:, :P] = mask_id  # the prompt masked
                both_mask = None if attention_mask is None else attention_mask.repeat(2, 1)
                cond, uncond = model(torch.cat([x, unconditional]), attention_mask=both_mask, head=head).chunk(2)
                logits = uncond + (cfg_scale + 1) * (cond - uncond)  # [B, G, V]
            else:
                logits = model(x, attention_mask=attention_mask, head=head)  # [B, G, V]
            if suppress_ids:
                logits[:, :, list(suppress_ids)] = -torch.inf
            x0 = add_gumbel_noise(logits, temperature, generator).argmax(dim=-1)  # [B, G]
            if remasking == "low_confidence":
                confidence = F.softmax(logits.float(), dim=-1).gather(-1, x0[..., None]).squeeze(-1)  # [B, G]
            else:
                device = generator.device if generator is not None else x0.device
                confidence = torch.rand(x0.shape, generator=generator, device=device).to(x0.device)
            if last_ids:
                # Confidences lie in [0, 1]: shifting to [-2, -1] orders them after every other masked position
                # but keeps them above the -inf of committed positions, so they are still committed in time.
                is_last = torch.isin(x0, torch.tensor(list(last_ids), device=x0.device))
                confidence = torch.where(is_last, confidence - 2, confidence)
            confidence[:, block_end:] = -torch.inf  # nothing past the current block
            confidence = torch.where(masked, confidence, -torch.inf)  # committed tokens stay
            commit = torch.zeros_like(masked)
            for b in range(B):
                commit[b, confidence[b].topk(int(schedule[b, step])).indices] = True
            x[:, P:] = torch.where(commit & masked, x0, x[:, P:])
    return x
