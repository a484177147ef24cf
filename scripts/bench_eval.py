"""Minimal pairs per second: babymerge's packed scoring against the BabyLM pipeline's way.

- ``packed``: :func:`babymerge.evaluate.score_candidates`: one sequence per item (the pair's
  common prefix once, a tree-shaped attention mask), length-sorted batches, LM head only on
  scored positions;
- ``pipeline_like``: what the pipeline's causal scoring does (``sentence_zero_shot``, bf55c11):
  batches of 64 items, each sentence a full right-padded sequence, the full-vocabulary logits of
  every position, ``log_softmax``, gather, the scored positions' sum;
- ``one_at_a_time`` (``--with-single``): one sentence per forward.

Data: real BLiMP (``--blimp DIR`` of its jsonl files, with ``--tokenizer DIR``: a babymerge
tokenizer, e.g. ``babymerge tokenizer`` trained on those sentences), or random pairs that differ
in one token, as a minimal pair does. The model is random, at the paper's size on CUDA and the
``small`` preset on a CPU unless ``--preset`` says otherwise; the 30k vocabulary either way.
Prints one JSON object: pairs/s of each path and their ratio, the fraction of token positions the
packing saves, the largest score difference between the paths, and on a GPU the packed path's
% of the device's peak.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from babymerge.benchmark import environment, peak_flops, synchronize
from babymerge.evaluate import load_tasks, pack_task, score_candidates
from babymerge.model import MODEL_PRESETS, build_model
from babymerge.tasks import TaskSpec

PIPELINE_BATCH = 64  # the pipeline's --batch_size default


def pipeline_like(model, task, batch_size: int = PIPELINE_BATCH) -> torch.Tensor:
    """Each sentence's score the pipeline's way (its causal collate and compute_causal_results):
    per batch of items, one right-padded forward per candidate index, full logits."""
    device = next(model.parameters()).device
    starts = task.item_start.tolist()
    out = torch.zeros(len(task.input_ids), dtype=torch.float64)
    with torch.no_grad():
        for first in range(0, task.num_items, batch_size):
            items = range(first, min(first + batch_size, task.num_items))
            for k in range(max(starts[i + 1] - starts[i] for i in items)):
                cands = [starts[i] + k for i in items if starts[i] + k < starts[i + 1]]
                width = max(len(task.input_ids[c]) for c in cands)
                ids = torch.zeros(len(cands), width, dtype=torch.long)
                keep = torch.zeros_like(ids)
                phrase = torch.zeros_like(ids)
                for r, c in enumerate(cands):
                    seq = task.input_ids[c]
                    ids[r, :len(seq)] = torch.tensor(seq)
                    keep[r, :len(seq)] = 1
                    phrase[r, task.score_from[c]:len(seq)] = 1
                ids, keep, phrase = ids.to(device), keep.to(device), phrase.to(device)
                rows = task.feature_rows[cands].to(device)
                logits = model(input_ids=ids[:, :-1], attention_mask=keep[:, :-1],
                               pixel_values=task.features.to(device)[rows]).logits
                logp = logits.float().log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
                out[cands] = (logp * phrase[:, 1:]).sum(1).double().cpu()
    return out


def one_at_a_time(model, task) -> torch.Tensor:
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for seq, start, row in zip(task.input_ids, task.score_from, task.feature_rows.tolist()):
            ids = torch.tensor([seq], device=device)
            logp = model(input_ids=ids, pixel_values=task.features[row:row + 1].to(device)
                         ).logits.float().log_softmax(-1)[0]
            targets = ids[0, start:]
            out.append(logp[start - 1:-1].gather(1, targets[:, None]).sum().item())
    return torch.tensor(out, dtype=torch.float64)


def positions(task) -> tuple[int, int]:
    """(token positions run by the packed path, by one sequence per candidate)."""
    return sum(len(p.ids) for p in task.packed), sum(len(s) for s in task.input_ids)


def scoring_flops(model, task) -> float:
    """Useful matmul FLOPs of the packed path (nanoGPT-style estimate; padding and the one
    projector matmul per sequence not counted): 2 x the decoder layers' weights per packed
    position, 2 x hidden x vocab per scored token (the LM head runs only there), and attention's
    QK^T and AV, 2 x hidden x L(L+1) per layer for a packed length L."""
    text = model.config.text_config
    layers = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n)
    total = 0
    for item in task.packed:
        length = len(item.ids)
        total += (2 * layers * length + 2 * text.hidden_size * text.vocab_size * len(item.scored)
                  + 2 * text.num_hidden_layers * text.hidden_size * length * (length + 1))
    return float(total)


def random_pairs(pairs: int, vocab: int, gen: torch.Generator) -> list[list[list[int]]]:
    """Sentences of 8-20 tokens and a copy with one token changed: a minimal pair's shape."""
    out = []
    for _ in range(pairs):
        n = int(torch.randint(8, 21, (1,), generator=gen))
        good = torch.randint(5, vocab, (n,), generator=gen).tolist()
        bad = list(good)
        at = int(torch.randint(0, n, (1,), generator=gen))
        bad[at] = 5 + (bad[at] - 5 + 1) % (vocab - 5)
        out.append([good, bad])
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=None, choices=sorted(MODEL_PRESETS),
                        help="model size (default: paper on CUDA, small on CPU)")
    parser.add_argument("--pairs", type=int, default=None, help="default 32 on CPU (--quick 16), "
                        "2000 on CUDA; with --blimp, the first N pairs of its files, spread")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=30000)
    parser.add_argument("--blimp", type=Path, default=None, help="folder of BLiMP jsonl files")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="babymerge tokenizer folder (with --blimp)")
    parser.add_argument("--with-single", action="store_true",
                        help="also time one sentence per forward")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                          if args.device == "auto" else args.device)
    preset = args.preset or ("small" if args.quick or device.type == "cpu" else "paper")
    pairs = args.pairs or (16 if args.quick else 32 if device.type == "cpu" else 2000)
    cfg = MODEL_PRESETS[preset]
    model = build_model(cfg, seed=0, vocab_size=args.vocab, image_token_id=4, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2).to(device).eval()
    gen = torch.Generator().manual_seed(0)
    black = torch.randn(1, cfg.feature_dim, generator=gen)
    if args.blimp is not None:
        from babymerge.tokenizer import load_tokenizer

        if args.tokenizer is None:
            parser.error("--blimp needs --tokenizer")
        files = sorted(args.blimp.glob("*.jsonl"))
        per_file = -(-pairs // len(files))
        sample = Path(tempfile.mkdtemp(prefix="bench_eval_"))
        for f in files:  # the first lines of every paradigm
            lines = f.read_text(encoding="utf-8").splitlines()[:per_file]
            (sample / f.name).write_text("\n".join(lines) + "\n", encoding="utf-8")
        # a text-only task reads only the black feature of its table
        [task] = load_tasks([f"minimal_pairs:{sample}"], load_tokenizer(args.tokenizer),
                            SimpleNamespace(black=black[0]))
        shutil.rmtree(sample)
        data = f"BLiMP, {len(files)} paradigms"
    else:
        task = pack_task(TaskSpec("bench", "minimal_pairs", "random"), [1, 4],
                         random_pairs(pairs, args.vocab, gen), [[0, 0]] * pairs,
                         ["bench"] * pairs, [0] * pairs, black)
        data = "random pairs differing in one token"
    pairs = task.num_items

    def timed(fn):
        synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        synchronize(device)
        return out, time.perf_counter() - t0

    score_candidates(model, task, args.batch_size, progress=False)  # warm-up
    packed, t_packed = timed(lambda: score_candidates(model, task, args.batch_size,
                                                      progress=False))
    reference, t_pipeline = timed(lambda: pipeline_like(model, task))
    packed_positions, unpacked_positions = positions(task)
    result = {
        "bench": "eval_minimal_pairs", **environment(device), "data": data,
        "preset": preset, "vocab": args.vocab, "pairs": pairs, "batch_size": args.batch_size,
        "pairs_per_s": {"packed": pairs / t_packed, "pipeline_like": pairs / t_pipeline},
        "speedup_packed_vs_pipeline_like": t_pipeline / t_packed,
        "positions": {"packed": packed_positions, "one_sequence_per_candidate":
                      unpacked_positions,
                      "saved_fraction": round(1 - packed_positions / unpacked_positions, 4)},
        "max_abs_score_diff": float((packed - reference).abs().max()),
    }
    if args.with_single:
        single, t_single = timed(lambda: one_at_a_time(model, task))
        result["pairs_per_s"]["one_at_a_time"] = pairs / t_single
        result["max_abs_score_diff_single"] = float((packed - single).abs().max())
    # % of the device's peak (the model scores in float32: the CUDA-core fp32 peak, as torch
    # leaves TF32 matmuls off by default); None on a CPU or a GPU missing from the table
    flops = scoring_flops(model, task)
    peak = peak_flops(device, next(model.parameters()).dtype)
    result |= {"gflops_per_pass": round(flops / 1e9, 4),
               "achieved_tflops_packed": round(flops / t_packed / 1e12, 4),
               "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
               "peak_tflops": peak and peak / 1e12,
               "pct_of_peak_packed": peak and round(100 * flops / t_packed / peak, 3)}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
