"""From the SFT files people already have to training batches for a masked diffusion LM.

    read_records      JSONL / JSON array -> Conversation (schema detection, one-line errors `path:line: ...`)
    tokenise          chat template: prompt = history + assistant header, response = answer + <|eot_id|>
    cache             tokenised numpy arrays keyed by sha256(file, tokenizer, settings); one writer per node
    SFTDataset        eval split, multi-turn policy, per-file weights
    BatchIterator     seeded shuffle identical on every rank, each rank its share, exact (epoch, offset)
    eval_batches      every eval sample exactly once across ranks, fixed order

CLI:
    python data.py make-demo demo                          # regenerate the CPU demo tokenizer and data
    python data.py check --tokenizer DIR FILE [FILE ...]   # validate files, print the length report
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import string
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch


class DataError(ValueError):
    """Bad input data; the message is one line: `path:line: what is wrong`."""


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)  # JSONL or JSON-array files; schema detected per record
    train_weights: list[float] = field(default_factory=list)  # per file: times each record is seen per epoch
    #   (2.0 = twice, 0.5 = a seeded half drawn anew each epoch); empty = 1.0 for every file
    eval_file: str = ""  # held-out file; empty = split eval_fraction off the train records
    eval_fraction: float = 0.01  # without eval_file: seeded split by record, same on every rank; 0 = no eval
    max_length: int = 4096  # prompt + response tokens per sample (the official recipe's 4096)
    pad_to: str = "longest"  # "longest" (micro-batch's longest, rounded to pad_multiple) | "max_length" (official)
    pad_multiple: int = 64  # round the padded length up to this (8 or 64 keep GPU matmuls efficient)
    multi_turn: str = "random"  # "random" (official: one assistant turn drawn per epoch per dialogue) | "last" |
    #   "all" (every assistant turn is its own sample). "random" is the default because LLaDA's recipe uses it.
    truncate: bool = False  # over-long samples: false = drop (counted); true = cut the response (no <|eot_id|>)
    length_grouping: bool = True  # pad_to=longest: batch samples of similar length (windows of 64 global batches)
    # pad_to=longest: add 0..N more EOS positions to each micro-batch (seeded by step). Without it a batch ends
    # right after its longest answer, so the model never sees long EOS runs and can learn to place the end of
    # its answer by where the canvas ends; sampling with a longer gen_length then cuts answers short.
    extra_padding: int = 0
    cache_dir: str = ".cache/data"  # tokenised arrays are stored here; "" = no cache
    seed: int = 0  # eval split, shuffling, multi-turn draws and weight subsampling


@dataclass
class Conversation:
    messages: list[dict]  # [{"role": "system" | "user" | "assistant", "content": str}, ...]
    source: str  # "path:line" where the record starts
    schema: str  # "messages" | "sharegpt" | "prompt_response" | "input_output" | "alpaca" | "s1k"


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L] long: prompt + response + end-of-turn + EOS padding (pad id = EOS)
    prompt_lengths: torch.Tensor  # [B] long: positions < prompt_len are never masked (includes the assistant header)
    answer_lengths: torch.Tensor  # [B] long: real response tokens incl. end-of-turn, before padding
    indices: torch.Tensor  # [B] long: global sample index; -1 marks an eval filler row (see eval_batches)


# ----------------------------------------------------------------------------- reading records

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
SCHEMAS = ("messages, conversations, prompt+response|completion, input+output, instruction(+input)+output, "
           "question+thinking_trajectories+attempt")


def read_records(path: str) -> list[Conversation]:
    """Read a JSONL file or a JSON array of objects; every record is validated and converted to messages."""
    if not os.path.isfile(path):
        raise DataError(f"{path}:0: file not found")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")  # tolerate a BOM, which some editors add
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x})") from None
    if not text.strip():
        raise DataError(f"{path}:1: file is empty")
    items = _json_array_items(text, path) if text.lstrip().startswith("[") else _jsonl_items(text, path)
    if not items:
        raise DataError(f"{path}:1: file holds no records")
    out = []
    for line, obj in items:
        where = f"{path}:{line}"
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        messages, schema = _to_messages(obj, where)
        _check_messages(messages, where)
        out.append(Conversation(messages, where, schema))
    return out


def _jsonl_items(text: str, path: str) -> list[tuple[int, object]]:
    items = []
    for line, s in enumerate(text.split("\n"), 1):
        if s.strip():  # blank lines (a trailing newline, say) hold no record
            try:
                items.append((line, json.loads(s)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line}: invalid JSON ({e.msg} at column {e.colno})") from None
    return items


def _json_array_items(text: str, path: str) -> list[tuple[int, object]]:
    """Decode `[obj, obj, ...]` element by element, so that each record keeps the line it starts on."""
    dec, items, pos, n = json.JSONDecoder(), [], text.index("[") + 1, len(text)

    def skip_ws(p: int) -> int:
        while p < n and text[p] in " \t\r\n":
            p += 1
        return p

    def fail(p: int, what: str) -> DataError:
        return DataError(f"{path}:{text.count(chr(10), 0, p) + 1}: invalid JSON ({what})")

    pos = skip_ws(pos)
    if pos < n and text[pos] == "]":
        return items
    while True:
        try:
            obj, end = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise fail(e.pos, e.msg) from None
        items.append((text.count("\n", 0, pos) + 1, obj))
        pos = skip_ws(end)
        if pos < n and text[pos] == ",":
            pos = skip_ws(pos + 1)
        elif pos < n and text[pos] == "]":
            if skip_ws(pos + 1) != n:
                raise fail(pos + 1, "extra data after the closing ']'")
            return items
        else:
            raise fail(pos, "expected ',' or ']'")


def _to_messages(rec: dict, where: str) -> tuple[list[dict], str]:
    """Map one record of any supported schema to role/content messages (validated later)."""
    def get(key: str):
        if not isinstance(rec[key], str):
            raise DataError(f"{where}: '{key}' is {type(rec[key]).__name__}, expected a string")
        return rec[key]

    if "messages" in rec or "conversations" in rec:
        sharegpt = "messages" not in rec
        key = "conversations" if sharegpt else "messages"
        turns = rec[key]
        if not isinstance(turns, list) or not turns:
            raise DataError(f"{where}: '{key}' must be a non-empty list of turns")
        messages = []
        for i, t in enumerate(turns):
            # ShareGPT uses from/value (human/gpt); some exports keep role/content inside "conversations".
            rk, ck = ("from", "value") if sharegpt and isinstance(t, dict) and "from" in t else ("role", "content")
            if not isinstance(t, dict) or rk not in t or ck not in t:
                found = sorted(t) if isinstance(t, dict) else type(t).__name__
                raise DataError(f"{where}: turn {i} needs '{rk}' and '{ck}', found {found}")
            role = SHAREGPT_ROLES.get(t[rk], t[rk]) if sharegpt and isinstance(t[rk], str) else t[rk]
            messages.append({"role": role, "content": t[ck]})
        return messages, "sharegpt" if sharegpt else "messages"
    if "question" in rec and "attempt" in rec and "thinking_trajectories" in rec:
        # s1K: the d1 / dLLM-Factory LLaDA recipe supervises the reasoning trace and the answer together.
        traj = rec["thinking_trajectories"]
        if not isinstance(traj, list) or not traj or not isinstance(traj[0], str):
            raise DataError(f"{where}: 'thinking_trajectories' must be a non-empty list of strings")
        answer = f"<reasoning>{traj[0]}</reasoning>\n<answer>{get('attempt')}</answer>"
        return _with_system(rec, where, get("question"), answer), "s1k"
    if "prompt" in rec and ("response" in rec or "completion" in rec):
        answer = get("response" if "response" in rec else "completion")
        return _with_system(rec, where, get("prompt"), answer), "prompt_response"
    if "instruction" in rec and "output" in rec:
        # Alpaca: the optional input follows the instruction after a blank line.
        user = get("instruction") + (f"\n\n{get('input')}" if rec.get("input") else "")
        return _with_system(rec, where, user, get("output")), "alpaca"
    if "input" in rec and "output" in rec:
        return _with_system(rec, where, get("input"), get("output")), "input_output"
    raise DataError(f"{where}: no known schema, keys found: {sorted(rec)} (expected one of: {SCHEMAS})")


def _with_system(rec: dict, where: str, user: str, answer: str) -> list[dict]:
    system = rec.get("system", "")  # an optional top-level system prompt, as ShareGPT exports have
    if not isinstance(system, str):
        raise DataError(f"{where}: 'system' is {type(system).__name__}, expected a string")
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def _check_messages(messages: list[dict], where: str) -> None:
    for i, m in enumerate(messages):
        if m["role"] not in ROLES:
            raise DataError(f"{where}: turn {i} has role {m['role']!r}, expected one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            kind = type(m["content"]).__name__
            raise DataError(f"{where}: turn {i} ({m['role']}) content is {kind}, expected a string")
        if m["role"] == "assistant" and not m["content"].strip():
            raise DataError(f"{where}: turn {i} is an empty assistant answer")
    if messages[-1]["role"] != "assistant":
        # Refusing beats silently dropping a trailing question nobody answers.
        raise DataError(f"{where}: the last turn is {messages[-1]['role']!r}, expected an assistant answer")


# ----------------------------------------------------------------------------- tokenisation

def load_tokenizer(path: str):
    """The model directory's tokenizer. trust_remote_code=False: LLaDA's auto_map would otherwise make
    transformers ask on stdin (hanging batch jobs), and its tokenizer is a plain fast tokenizer anyway."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001  (transformers raises many kinds; we want one line)
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{path}:0: cannot load tokenizer ({why})") from None
    if not getattr(tok, "chat_template", None):
        raise DataError(f"{path}:0: tokenizer has no chat_template")
    return tok


def special_token_ids(tokenizer) -> dict[str, int | None]:
    """bos, eos, pad, mask, eot ids, found by LLaDA's token names (the mask is not tokenizer.mask_token)."""
    vocab = tokenizer.get_vocab()
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else vocab.get("<|endoftext|>")
    return {
        "bos": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else vocab.get("<|startoftext|>"),
        "eos": eos,
        "pad": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
        "mask": vocab.get("<|mdm_mask|>"),
        "eot": vocab.get("<|eot_id|>", eos),
    }


def _render(tokenizer, messages: list[dict], gen: bool, where: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    except Exception as e:  # noqa: BLE001  (a template may raise anything, e.g. on an unsupported role)
        raise DataError(f"{where}: chat template failed: {' '.join(str(e).split())}") from None


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Tokens of the history plus the assistant header: the part that is never masked. Rendered to text
    first (transformers 5 returns a BatchEncoding for tokenize=True) and encoded without special tokens,
    because the template already adds BOS."""
    return tokenizer.encode(_render(tokenizer, messages, True, "prompt"), add_special_tokens=False)


def tokenise_file(path: str, tokenizer, *, max_length: int, truncate: bool) -> dict[str, np.ndarray]:
    """Read and tokenise one file. Every assistant turn becomes a *variant* (history -> that answer);
    the multi-turn policy picks among them later, so the cache does not depend on it."""
    records = read_records(path)
    eot = special_token_ids(tokenizer)["eot"]
    texts, owners = [], []  # (prompt, full) text pairs, each owned by (record, turn)
    for r, conv in enumerate(records):
        for i, m in enumerate(conv.messages):
            if m["role"] == "assistant":
                texts += [_render(tokenizer, conv.messages[:i], True, conv.source),
                          _render(tokenizer, conv.messages[: i + 1], False, conv.source)]
                owners.append((r, i == len(conv.messages) - 1))
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]  # one batched call: the Rust side is fast
    seqs, prompt_lens, rec_of, is_last, truncated, dropped = [], [], [], [], [], []
    for k, (r, last) in enumerate(owners):
        prompt, full, where = ids[2 * k], ids[2 * k + 1], records[r].source
        if full[: len(prompt)] != prompt:
            raise DataError(f"{where}: the chat template's prompt tokens are not a prefix of the conversation's tokens")
        response = full[len(prompt):]
        if not response or response[-1] != eot:
            raise DataError(f"{where}: the rendered answer does not end with the end-of-turn token (id {eot})")
        cut = False
        if len(full) > max_length:
            if not truncate or len(prompt) >= max_length:
                dropped.append(int(where.rsplit(":", 1)[1]))
                continue
            full, cut = full[:max_length], True
        seqs.append(full)
        prompt_lens.append(len(prompt))
        rec_of.append(r)
        is_last.append(last)
        truncated.append(cut)
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    meta = {"records": len(records), "schemas": dict(Counter(c.schema for c in records))}
    return {
        "tokens": np.array([t for s in seqs for t in s], dtype=np.int32),
        "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        "prompt_lens": np.array(prompt_lens, dtype=np.int32),
        "record": np.array(rec_of, dtype=np.int32),  # record index within the file, for split and multi-turn
        "is_last": np.array(is_last, dtype=bool),  # the record's final turn (multi_turn="last")
        "truncated": np.array(truncated, dtype=bool),
        "dropped_lines": np.array(dropped, dtype=np.int32),
        "meta": np.array(json.dumps(meta)),
    }


# ----------------------------------------------------------------------------- cache

CACHE_VERSION = 1
CACHE_WAIT_S = 7200.0


def _cache_key(path: str, tokenizer, max_length: int, truncate: bool) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION} max_length={max_length} truncate={truncate}\n".encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    # Hash the tokenizer itself (vocab, merges, normaliser, added tokens) and its template, not file paths.
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))).encode())
    h.update(str(tokenizer.chat_template).encode())
    return h.hexdigest()


def load_or_tokenise(path: str, tokenizer, *, max_length: int, truncate: bool, cache_dir: str,
                     rank: int = 0) -> tuple[dict[str, np.ndarray], bool]:
    """Tokenised arrays for one file and whether they came from the cache.

    One writer per node (LOCAL_RANK 0, else rank 0) tokenises and writes atomically (temp file + rename);
    the others poll for the file. Polling, not a barrier, so that a DataError on the writer reaches the
    others through an `.err` file instead of leaving them hung in a collective."""
    if not cache_dir:
        return tokenise_file(path, tokenizer, max_length=max_length, truncate=truncate), False
    if not os.path.isfile(path):
        raise DataError(f"{path}:0: file not found")
    key = _cache_key(path, tokenizer, max_length, truncate)
    target = os.path.join(cache_dir, f"{os.path.basename(path)}.{key[:20]}.npz")
    err = target[:-4] + ".err"
    writer = int(os.environ.get("LOCAL_RANK", rank)) == 0
    if not os.path.exists(target) and writer:
        os.makedirs(cache_dir, exist_ok=True)
        try:
            arrays = tokenise_file(path, tokenizer, max_length=max_length, truncate=truncate)
        except DataError as e:
            _atomic_write(err, lambda f: f.write(str(e).encode()))
            raise
        _atomic_write(target, lambda f: np.savez(f, **arrays))
        return arrays, False
    start = time.time()
    while not os.path.exists(target):
        if os.path.exists(err):
            with open(err, encoding="utf-8") as f:
                raise DataError(f.read())
        if time.time() - start > CACHE_WAIT_S:
            raise DataError(f"{path}:0: waited {CACHE_WAIT_S:.0f}s for rank 0 to write {target}")
        time.sleep(0.2)
    with np.load(target, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}, True


def _atomic_write(target: str, write: Callable) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target) or ".", prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        write(f)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; other users of a shared cache must read it
    os.replace(tmp, target)  # readers never see a half-written file


# ----------------------------------------------------------------------------- datasets

class SFTDataset:
    """Tokenised samples in flat arrays. A *sample* is what the iterator schedules; it owns one variant
    (multi_turn "last"/"all") or all variants of a conversation ("random": one drawn per epoch)."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, prompt_lens: np.ndarray, truncated: np.ndarray,
                 sample_starts: np.ndarray, file_ids: np.ndarray, *, weights: list[float], seed: int):
        self.tokens, self.offsets, self.prompt_lens, self.truncated = tokens, offsets, prompt_lens, truncated
        self.sample_starts = sample_starts  # [n_samples + 1] into the variants
        self.file_ids = file_ids  # [n_samples] which train file each sample came from (for weights)
        self.weights, self.seed = weights, seed
        self._variant_cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.sample_starts) - 1

    def variants(self, epoch: int) -> np.ndarray:
        """[n_samples] the variant each sample uses this epoch: a deterministic draw from (seed, epoch, index)."""
        if epoch not in self._variant_cache:
            counts = np.diff(self.sample_starts)
            u = np.random.default_rng([self.seed, epoch, 1]).random(len(self))
            self._variant_cache = {epoch: self.sample_starts[:-1] + (u * counts).astype(np.int64)}
        return self._variant_cache[epoch]

    def lengths(self, epoch: int = 0) -> np.ndarray:
        v = self.variants(epoch)
        return self.offsets[v + 1] - self.offsets[v]

    def sample(self, index: int, epoch: int = 0) -> tuple[np.ndarray, int]:
        """(token ids, prompt length) of one sample in this epoch."""
        v = self.variants(epoch)[index]
        return self.tokens[self.offsets[v]: self.offsets[v + 1]], int(self.prompt_lens[v])

    def epoch_samples(self, epoch: int) -> np.ndarray:
        """Sample indices of one epoch before shuffling. A file with weight w contributes each of its samples
        floor(w) times plus a seeded subset (drawn per epoch) of round(frac(w) * n) of them, so the epoch size
        is the same every epoch and train.py can convert epochs into steps."""
        parts = []
        for f, w in enumerate(self.weights):
            idx = np.flatnonzero(self.file_ids == f)
            extra = round((w - math.floor(w)) * len(idx))
            rng = np.random.default_rng([self.seed, epoch, 2, f])
            parts += [idx] * math.floor(w) + [np.sort(rng.choice(idx, extra, replace=False))]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _make_dataset(files: list[dict], selections: list[np.ndarray], multi_turn: str, weights: list[float],
                  seed: int) -> SFTDataset:
    """Concatenate the variants of the selected records of each file and group them into samples."""
    toks, offs, plens, truncs, starts, fids, n_tok, n_var = [], [], [], [], [0], [], 0, 0
    for f, (arr, keep) in enumerate(zip(files, selections)):
        rec = arr["record"]
        chosen = np.flatnonzero(np.isin(rec, keep))
        if multi_turn == "last":  # only the final answer; a record whose final answer was dropped is gone
            chosen = chosen[arr["is_last"][chosen]]
        if multi_turn == "random":  # one sample per record, all its variants
            bounds = np.flatnonzero(np.r_[True, rec[chosen][1:] != rec[chosen][:-1]]) if len(chosen) else chosen
        else:  # "last" / "all": one sample per variant
            bounds = np.arange(len(chosen))
        all_lens = np.diff(arr["offsets"])
        lens = all_lens[chosen]
        keep_var = np.zeros(len(all_lens), dtype=bool)
        keep_var[chosen] = True
        toks.append(arr["tokens"][np.repeat(keep_var, all_lens)])  # chosen is sorted: order is kept
        offs.append(n_tok + np.cumsum(lens))
        plens.append(arr["prompt_lens"][chosen])
        truncs.append(arr["truncated"][chosen])
        starts += list(n_var + bounds[1:]) + ([n_var + len(chosen)] if len(chosen) else [])
        fids.append(np.full(len(bounds), f, dtype=np.int64))
        n_tok, n_var = n_tok + int(lens.sum()), n_var + len(chosen)
    cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)  # noqa: E731
    return SFTDataset(cat(toks, np.int32), np.concatenate([[0]] + offs).astype(np.int64), cat(plens, np.int32),
                      cat(truncs, bool), np.array(starts, dtype=np.int64), cat(fids, np.int64),
                      weights=weights, seed=seed)


def build_datasets(
    cfg: DataConfig, tokenizer, *, rank: int = 0, world_size: int = 1, log: Callable[[str], None] = print,
    micro_batch_size: int = 1,
) -> tuple[SFTDataset, SFTDataset | None]:
    """Train and eval datasets, identical on every rank, and the length report through `log`.
    micro_batch_size and world_size only shape the padding estimate in the report."""
    _check_config(cfg)
    paths = cfg.train_files + ([cfg.eval_file] if cfg.eval_file else [])
    loaded = [load_or_tokenise(p, tokenizer, max_length=cfg.max_length, truncate=cfg.truncate,
                               cache_dir=cfg.cache_dir, rank=rank) for p in paths]
    arrays, hits = [a for a, _ in loaded], [h for _, h in loaded]
    files = arrays[: len(cfg.train_files)]
    n_records = [_meta(a)["records"] for a in files]
    train_sel, evals = [np.arange(n) for n in n_records], None
    total = sum(n_records)
    n_eval = min(max(1, round(cfg.eval_fraction * total)), total - 1) if cfg.eval_fraction > 0 else 0
    if cfg.eval_file:
        evals = _make_dataset(arrays[-1:], [np.arange(_meta(arrays[-1])["records"])], cfg.multi_turn, [1.0], cfg.seed)
    elif n_eval > 0:
        # Split by record (before multi-turn expansion) with a seeded permutation of all train records:
        # every rank computes the same split, unlike the tool this replaces.
        held = np.zeros(total, dtype=bool)
        held[np.random.default_rng([cfg.seed, 3]).permutation(total)[:n_eval]] = True
        bounds = np.cumsum([0] + n_records)
        train_sel = [np.flatnonzero(~held[bounds[f]: bounds[f + 1]]) for f in range(len(files))]
        eval_sel = [np.flatnonzero(held[bounds[f]: bounds[f + 1]]) for f in range(len(files))]
        evals = _make_dataset(files, eval_sel, cfg.multi_turn, [1.0] * len(files), cfg.seed)
    train = _make_dataset(files, train_sel, cfg.multi_turn, list(cfg.train_weights) or [1.0] * len(files), cfg.seed)
    if len(train) == 0:
        raise DataError(f"{cfg.train_files[0]}:0: no training samples left (all dropped as over max_length?)")
    for line in length_report(cfg, paths, arrays, hits, train, evals, tokenizer, micro_batch_size, world_size):
        log(line)
    return train, evals


def _meta(arrays: dict) -> dict:
    return json.loads(str(arrays["meta"]))


def _check_config(cfg: DataConfig) -> None:
    checks = [
        (bool(cfg.train_files), "data.train_files: no training files given"),
        (not cfg.train_weights or len(cfg.train_weights) == len(cfg.train_files),
         f"data.train_weights: {len(cfg.train_weights)} weights for {len(cfg.train_files)} files"),
        (all(w >= 0 for w in cfg.train_weights), "data.train_weights: weights must be >= 0"),
        (0 <= cfg.eval_fraction < 1, f"data.eval_fraction: {cfg.eval_fraction} is not in [0, 1)"),
        (cfg.max_length > 0, f"data.max_length: {cfg.max_length} must be positive"),
        (cfg.pad_to in ("longest", "max_length"), f"data.pad_to: {cfg.pad_to!r} is not 'longest' or 'max_length'"),
        (cfg.pad_multiple > 0, f"data.pad_multiple: {cfg.pad_multiple} must be positive"),
        (cfg.extra_padding >= 0, f"data.extra_padding: {cfg.extra_padding} must be >= 0"),
        (cfg.extra_padding == 0 or cfg.pad_to == "longest", "data.extra_padding: only applies to pad_to = 'longest'"),
        (cfg.multi_turn in ("last", "all", "random"), f"data.multi_turn: {cfg.multi_turn!r} not last|all|random"),
    ]
    for ok, msg in checks:
        if not ok:
            raise DataError(msg)


def length_report(cfg: DataConfig, paths: list[str], files: list[dict], hits: list[bool], train: SFTDataset,
                  evals: SFTDataset | None, tokenizer, micro_batch_size: int, world_size: int) -> list[str]:
    """The short report printed at start: what was read, dropped, truncated, and how long samples are."""
    lines = []
    for path, arr, hit in zip(paths, files, hits):
        meta = _meta(arr)
        schemas = ", ".join(f"{k} {v}" for k, v in sorted(meta["schemas"].items()))
        drop = arr["dropped_lines"]
        msg = f"data: {path}: {meta['records']} records ({schemas}), {len(arr['prompt_lens'])} turn samples"
        if len(drop):
            more = ", ..." if len(drop) > 5 else ""
            first = ", ".join(map(str, drop[:5]))
            msg += f"; dropped {len(drop)} over max_length={cfg.max_length} (lines {first}{more})"
        if arr["truncated"].any():
            msg += f"; truncated {int(arr['truncated'].sum())} responses to max_length (they have no end-of-turn)"
        lines.append(msg + ("  [cache hit]" if hit else ""))
    n_eval = len(evals) if evals is not None else 0
    lines.append(f"data: {len(train)} train / {n_eval} eval samples, multi_turn={cfg.multi_turn}, "
                 f"{len(train.epoch_samples(0))} samples per epoch after weights")
    v = train.variants(0)
    plen = train.prompt_lens[v].astype(np.int64)
    rlen = train.lengths(0) - plen
    pct = lambda x: "/".join(str(int(np.percentile(x, q))) for q in (50, 90, 99)) + f"/{int(x.max())}"  # noqa: E731
    lines.append(f"data: tokens p50/p90/p99/max: prompt {pct(plen)}, response {pct(rlen)}")
    it = BatchIterator.from_config(train, cfg, micro_batch_size, world_size=world_size,
                                   pad_id=special_token_ids(tokenizer)["pad"], check_size=False)
    lines.append(f"data: padding {100 * it.padding_fraction(0):.1f}% of tokens (pad_to={cfg.pad_to}, "
                 f"multiple {cfg.pad_multiple}, micro-batch {micro_batch_size}, length_grouping={cfg.length_grouping}"
                 + (f", extra_padding {cfg.extra_padding})" if cfg.extra_padding else ")"))
    return lines


# ----------------------------------------------------------------------------- batching

def collate(dataset: SFTDataset, indices: np.ndarray, epoch: int, *, pad_to: str, pad_multiple: int,
            max_length: int, pad_id: int, extra: int = 0) -> Batch:
    seqs = [dataset.sample(int(i), epoch) for i in indices]
    longest = max(len(s) for s, _ in seqs)
    L = max_length if pad_to == "max_length" else min(-(-longest // pad_multiple) * pad_multiple + extra, max_length)
    ids = np.full((len(seqs), max(L, longest)), pad_id, dtype=np.int64)  # [B, L] EOS padding is supervised
    for b, (s, _) in enumerate(seqs):
        ids[b, : len(s)] = s
    return Batch(
        input_ids=torch.from_numpy(ids),
        prompt_lengths=torch.tensor([p for _, p in seqs], dtype=torch.long),
        answer_lengths=torch.tensor([len(s) - p for s, p in seqs], dtype=torch.long),
        indices=torch.as_tensor(np.asarray(indices, dtype=np.int64)),
    )


class BatchIterator:
    """Infinite stream of micro-batches. Each epoch's order depends only on (seed, epoch), so every rank
    computes the same global batches of micro_batch_size * world_size samples and takes its own slice.
    The tail of an epoch smaller than one global batch is left out (a different one each epoch)."""

    def __init__(self, dataset: SFTDataset, micro_batch_size: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, pad_to: str = "longest", pad_multiple: int = 64, max_length: int = 4096,
                 pad_id: int, length_grouping: bool = False, group_window: int = 64, extra_padding: int = 0,
                 check_size: bool = True):
        self.dataset, self.mbs, self.rank, self.world_size = dataset, micro_batch_size, rank, world_size
        self.seed, self.pad_to, self.pad_multiple, self.max_length = seed, pad_to, pad_multiple, max_length
        self.pad_id, self.length_grouping, self.group_window = pad_id, length_grouping, group_window
        self.extra_padding = extra_padding if pad_to == "longest" else 0
        self.epoch, self.offset = 0, 0  # position of the NEXT global batch
        self._plan_cache: tuple[int, np.ndarray, np.ndarray] | None = None  # (epoch, plan, extras)
        if check_size and self.steps_per_epoch == 0:
            raise DataError(f"data: {len(dataset.epoch_samples(0))} samples per epoch, fewer than one global "
                            f"batch ({micro_batch_size} x {world_size} ranks)")

    @classmethod
    def from_config(cls, dataset: SFTDataset, cfg: DataConfig, micro_batch_size: int, *, rank: int = 0,
                    world_size: int = 1, pad_id: int, check_size: bool = True) -> BatchIterator:
        return cls(dataset, micro_batch_size, rank=rank, world_size=world_size, seed=cfg.seed, pad_to=cfg.pad_to,
                   pad_multiple=cfg.pad_multiple, max_length=cfg.max_length, pad_id=pad_id,
                   length_grouping=cfg.length_grouping, extra_padding=cfg.extra_padding, check_size=check_size)

    @property
    def global_batch(self) -> int:
        return self.mbs * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        """Micro-steps (global batches) per epoch; the same on every rank and every epoch."""
        return len(self.dataset.epoch_samples(0)) // self.global_batch

    def plan(self, epoch: int) -> np.ndarray:
        """[steps_per_epoch, global_batch] sample indices of one epoch, identical on every rank."""
        self._cache_epoch(epoch)
        return self._plan_cache[1]

    def extras(self, epoch: int) -> np.ndarray:
        """[steps_per_epoch] extra EOS positions of each global batch: a function of (seed, epoch, step), so
        all ranks pad alike and a resumed run pads as the original did."""
        self._cache_epoch(epoch)
        return self._plan_cache[2]

    def _cache_epoch(self, epoch: int) -> None:
        if self._plan_cache is None or self._plan_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch, 4])
            order = self.dataset.epoch_samples(epoch)
            order = order[rng.permutation(len(order))]
            G = self.global_batch
            order = order[: len(order) // G * G]
            if self.length_grouping and self.pad_to == "longest":
                # Sort inside shuffled windows so a batch holds similar lengths (little padding), then shuffle
                # the batches so the run does not see a length curriculum.
                lens, W = self.dataset.lengths(epoch)[order], G * self.group_window
                order = np.concatenate([order[i: i + W][np.argsort(lens[i: i + W], kind="stable")]
                                        for i in range(0, len(order), W)] or [order])
                batches = order.reshape(-1, G)
                batches = batches[rng.permutation(len(batches))]
            else:
                batches = order.reshape(-1, G)
            # extra EOS positions per step (all 0 when extra_padding is 0), drawn once per epoch
            extras = np.random.default_rng([self.seed, epoch, 6]).integers(0, self.extra_padding + 1, len(batches))
            self._plan_cache = (epoch, batches, extras)

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Batch:
        if self.offset >= self.steps_per_epoch:
            self.epoch, self.offset = self.epoch + 1, 0
        rows = self.plan(self.epoch)[self.offset, self.rank * self.mbs: (self.rank + 1) * self.mbs]
        extra = int(self.extras(self.epoch)[self.offset])
        self.offset += 1
        return collate(self.dataset, rows, self.epoch, pad_to=self.pad_to, pad_multiple=self.pad_multiple,
                       max_length=self.max_length, pad_id=self.pad_id, extra=extra)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, d: dict) -> None:
        self.epoch, self.offset = int(d["epoch"]), int(d["offset"])

    def padding_fraction(self, epoch: int = 0) -> float:
        """Share of padded positions over one epoch on all ranks, computed from lengths alone."""
        lens = self.dataset.lengths(epoch)[self.plan(epoch)].reshape(-1, self.mbs)  # [micro-batches, mbs]
        if lens.size == 0:
            return 0.0
        if self.pad_to == "max_length":
            padded = np.full(len(lens), self.max_length)
        else:
            extra = np.repeat(self.extras(epoch), self.world_size)  # rows are (step, rank) micro-batches
            padded = np.minimum(-(-lens.max(1) // self.pad_multiple) * self.pad_multiple + extra, self.max_length)
        return float(1 - lens.sum() / (padded.sum() * self.mbs))


def eval_batches(dataset: SFTDataset, micro_batch_size: int, *, rank: int = 0, world_size: int = 1,
                 pad_to: str = "longest", pad_multiple: int = 64, max_length: int = 4096,
                 pad_id: int) -> Iterator[Batch]:
    """Each eval sample exactly once over all ranks, in index order (epoch 0's draw for multi_turn="random").
    Every rank yields the same number of batches, because FSDP/DDP forwards must line up: when the last
    global batch leaves a rank without samples, it gets one filler row (a copy of sample 0) marked with
    indices == -1 and answer_lengths == 0, which callers leave out of their sums."""
    n, G = len(dataset), micro_batch_size * world_size
    for start in range(0, n, G):
        rows = np.arange(start + rank * micro_batch_size, min(start + (rank + 1) * micro_batch_size, n))
        filler = len(rows) == 0
        batch = collate(dataset, rows if not filler else np.zeros(1, dtype=np.int64), 0, pad_to=pad_to,
                        pad_multiple=pad_multiple, max_length=max_length, pad_id=pad_id)
        if filler:  # answer_lengths 0 means nothing in it is scored (diffusion.validation_sums skips it)
            batch.indices.fill_(-1)
            batch.answer_lengths.zero_()
        yield batch


def eval_steps(n_samples: int, micro_batch_size: int, world_size: int) -> int:
    """Number of batches eval_batches yields on every rank."""
    return -(-n_samples // (micro_batch_size * world_size))


# ----------------------------------------------------------------------------- demo assets

DEMO_SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>", "<|start_header_id|>", "<|end_header_id|>",
                 "<|eot_id|>", "<|unk|>"]
DEMO_ROLE_WORDS = ["user", "assistant", "system"]  # single tokens, so the chat headers stay short
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def make_demo_tokenizer(out_dir: str) -> None:
    """A character-level tokenizer with LLaDA's special token names and a Llama-3-style chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list(string.digits + string.ascii_lowercase + " " + string.punctuation + "\n")
    vocab = {t: i for i, t in enumerate(DEMO_SPECIALS + chars + DEMO_ROLE_WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"user|assistant|system|[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()  # join characters back without spaces
    tok.add_special_tokens(DEMO_SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="<|unk|>", chat_template=LLAMA3_TEMPLATE)
    fast.save_pretrained(out_dir)
    # Keep LLaDA's layout: the template inside tokenizer_config.json and a class name transformers 4.x knows.
    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=LLAMA3_TEMPLATE, model_max_length=4096)
    cfg.pop("backend", None)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    jinja = os.path.join(out_dir, "chat_template.jinja")
    if os.path.exists(jinja):
        os.remove(jinja)


def _demo_record(rng: random.Random) -> dict:
    digits = [rng.randrange(10) for _ in range(rng.randint(5, 10))]
    task = rng.choice(["sort", "reverse"])
    answer = sorted(digits) if task == "sort" else digits[::-1]
    # No spaces between digits: half the tokens per sample, and answer digit i lines up with prompt digit i.
    return {"prompt": f"{task}: {''.join(map(str, digits))}", "response": "".join(map(str, answer))}


def make_demo(out_dir: str, n_train: int = 20000, n_eval: int = 200, seed: int = 0) -> None:
    """Deterministically write out_dir/tokenizer/, sort_train.jsonl and sort_eval.jsonl (no prompt shared)."""
    make_demo_tokenizer(os.path.join(out_dir, "tokenizer"))
    rng, seen, eval_recs, train_recs = random.Random(seed), set(), [], []
    while len(eval_recs) < n_eval:
        rec = _demo_record(rng)
        if rec["prompt"] not in seen:
            seen.add(rec["prompt"])
            eval_recs.append(rec)
    while len(train_recs) < n_train:
        rec = _demo_record(rng)
        if rec["prompt"] not in seen:  # held-out prompts never appear in train; train has no duplicates either
            seen.add(rec["prompt"])
            train_recs.append(rec)
    for name, recs in (("sort_train.jsonl", train_recs), ("sort_eval.jsonl", eval_recs)):
        with open(os.path.join(out_dir, name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in recs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("make-demo", help="write the demo tokenizer and data").add_argument("out_dir")
    c = sub.add_parser("check", help="validate data files and print the length report")
    c.add_argument("--tokenizer", required=True)
    c.add_argument("--max-length", type=int, default=4096)
    c.add_argument("--multi-turn", default="random")
    c.add_argument("files", nargs="+")
    args = p.parse_args(argv)
    try:
        if args.cmd == "make-demo":
            make_demo(args.out_dir)
            print(f"wrote {args.out_dir}/tokenizer, sort_train.jsonl, sort_eval.jsonl")
        else:
            cfg = DataConfig(train_files=args.files, max_length=args.max_length, multi_turn=args.multi_turn,
                             eval_fraction=0.0, cache_dir="")
            build_datasets(cfg, load_tokenizer(args.tokenizer))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
