"""Generate answers with a LLaDA checkpoint (optionally plus a LoRA adapter) using diffusion.generate.

    python generate.py MODEL_DIR --prompt "sort: 3912"
    python generate.py MODEL_DIR --adapter runs/x/step_000200/adapter --input demo/sort_eval.jsonl --output out.jsonl

--input takes any format data.py reads (the last assistant turn becomes the reference answer, and
exact-match accuracy is reported), or prompt-only JSONL lines: {"prompt": ...} or {"messages": [...]}
ending with a user turn. Prompts are left-padded into batches; outputs are cut at the first end-of-turn/EOS.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from tqdm import tqdm

from data import DataError, encode_prompt, load_tokenizer, read_records, special_token_ids
from diffusion import generate, make_generator
from model import LLaDA

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class GenerateError(ValueError):
    """Bad arguments or input files; one-line message."""


def read_prompts(path: str) -> list[tuple[list[dict], str | None]]:
    """(history, reference answer or None) per record: a training file (every record has its answer, as
    data.read_records demands) or a prompt-only JSONL file ({"prompt": ...} or messages ending with a user turn)."""
    try:
        return [(c.messages[:-1], c.messages[-1]["content"]) for c in read_records(path)]
    except DataError as error:
        if not os.path.isfile(path):
            raise
        first_error = error
    out = []  # not a training file: it may be a prompt-only file, where every line has a prompt and no answer
    for text in open(path, encoding="utf-8-sig"):
        if not text.strip():
            continue
        try:
            rec = json.loads(text)
        except json.JSONDecodeError:
            raise first_error from None
        if not isinstance(rec, dict) or "response" in rec or "completion" in rec:
            raise first_error
        if isinstance(rec.get("prompt"), str):
            system = [{"role": "system", "content": rec["system"]}] if isinstance(rec.get("system"), str) else []
            out.append((system + [{"role": "user", "content": rec["prompt"]}], None))
        elif isinstance(rec.get("messages"), list) and rec["messages"] \
                and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in rec["messages"]) \
                and rec["messages"][-1].get("role") == "user":
            out.append(([{"role": m["role"], "content": m["content"]} for m in rec["messages"]], None))
        else:
            raise first_error
    return out


def left_pad(prompts: list[list[int]], pad_id: int, device: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[B, P] ids left-padded with pad_id and the [B, P] attention mask (None when no row is padded)."""
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (P - len(p)) + p for p in prompts], device=device)
    if all(len(p) == P for p in prompts):
        return ids, None
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


def cut_at_stop(ids: list[int], stop_ids: set[int]) -> list[int]:
    for i, token in enumerate(ids):
        if token in stop_ids:
            return ids[:i]
    return ids


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit status 1, like every other bad input
        raise GenerateError(f"{message} (see --help)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = _Parser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir", help="LLaDA checkpoint directory (config.json, safetensors, tokenizer)")
    ap.add_argument("--adapter", help="LoRA adapter directory to apply on top of the model")
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one user message")
    source.add_argument("--input", help="JSONL/JSON file of records (data.py formats) or prompt-only lines")
    ap.add_argument("--output", help="write JSONL {prompt, output, reference?, correct?} here instead of printing")
    ap.add_argument("--steps", type=int, default=128, help="denoising steps in total (split evenly over blocks)")
    ap.add_argument("--gen-length", type=int, default=128, help="generated tokens (a multiple of --block-length)")
    ap.add_argument("--block-length", type=int, default=32, help="semi-autoregressive block size (8-64 limit EOS runs)")
    ap.add_argument("--temperature", type=float, default=0.0, help="Gumbel temperature; 0 = greedy")
    ap.add_argument("--cfg-scale", type=float, default=0.0, help="classifier-free guidance scale; 0 = off")
    ap.add_argument("--remasking", default="low_confidence", choices=["low_confidence", "random"])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--suppress-eos", action="store_true", help="never generate EOS (the padding token)")
    ap.add_argument("--eos-last", action="store_true", help="commit EOS / end-of-turn predictions last")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: bfloat16 on CUDA, else float32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    for name in ("steps", "gen_length", "block_length", "batch_size"):
        if getattr(args, name) < 1:
            raise GenerateError(f"--{name.replace('_', '-')} must be >= 1")
    if args.gen_length % args.block_length or args.steps % (args.gen_length // args.block_length):
        raise GenerateError(f"--gen-length ({args.gen_length}) must be a multiple of --block-length "
                            f"({args.block_length}) and --steps ({args.steps}) a multiple of the number of blocks")
    if not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        raise GenerateError(f"{args.model_dir}: not a model directory (no config.json)")
    return args


def run(args: argparse.Namespace) -> float | None:
    """Generate for every prompt; returns the exact-match accuracy when references exist."""
    dtype = DTYPES.get(args.dtype, torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    tokenizer = load_tokenizer(args.model_dir)
    records = [([{"role": "user", "content": args.prompt}], None)] if args.prompt is not None \
        else read_prompts(args.input)
    model = LLaDA.from_pretrained(args.model_dir, dtype=dtype, device=args.device)
    if args.adapter:
        from lora import load_adapter
        load_adapter(model, args.adapter)
        model.to(args.device)
    model.eval()
    special = special_token_ids(tokenizer)
    mask_id, eos_id, eot_id = model.config.mask_token_id, special["eos"], special["eot"]
    if special["mask"] is not None and special["mask"] != mask_id:
        print(f"warning: config.json mask_token_id {mask_id} differs from the tokenizer's <|mdm_mask|> "
              f"{special['mask']}; using the config's", file=sys.stderr)
    generator = make_generator(args.seed, device=args.device)

    prompts = [encode_prompt(tokenizer, history) for history, _ in records]
    # Similar lengths together waste less padding; results are written back in input order.
    order = sorted(range(len(records)), key=lambda i: len(prompts[i]))
    outputs: list[str] = [""] * len(records)
    batches = [order[i:i + args.batch_size] for i in range(0, len(order), args.batch_size)]
    for batch in tqdm(batches, desc="generate", unit="batch", disable=len(batches) == 1, file=sys.stderr):
        ids, attention_mask = left_pad([prompts[i] for i in batch], special["pad"], args.device)
        out = generate(model, ids, steps=args.steps, gen_length=args.gen_length, block_length=args.block_length,
                       temperature=args.temperature, cfg_scale=args.cfg_scale, remasking=args.remasking,
                       mask_id=mask_id, attention_mask=attention_mask,
                       suppress_ids=(eos_id,) if args.suppress_eos else (),
                       last_ids=(eos_id, eot_id) if args.eos_last else (), generator=generator)
        for row, i in enumerate(batch):
            tokens = cut_at_stop(out[row, ids.shape[1]:].tolist(), {eos_id, eot_id})
            outputs[i] = tokenizer.decode(tokens, skip_special_tokens=True)

    rows = []
    for (history, reference), output in zip(records, outputs):
        row = {"prompt": history[-1]["content"] if history else "", "output": output}
        if reference is not None:
            row.update(reference=reference, correct=output.strip() == reference.strip())
        rows.append(row)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    else:
        for row in rows:
            print(f"### {row['prompt']}\n{row['output']}\n")
    scored = [row["correct"] for row in rows if "correct" in row]
    if not scored:
        return None
    accuracy = sum(scored) / len(scored)
    print(f"exact match: {sum(scored)}/{len(scored)} = {100 * accuracy:.1f}%")
    return accuracy


def main(argv: list[str] | None = None) -> int:
    try:
        run(parse_args(argv))
    except (ValueError, OSError) as error:  # DataError, CheckpointError, GenerateError, missing files
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
