"""Time the merge: one alpha's step, and a whole sweep from a cold start, against the baselines.

One alpha (in this process, fastest of ``--repeats``, the paths taking turns):

- ``inplace``: what ``babymerge merge`` does: ``kernels.interpolate_`` overwrites the live model's
  parameters from the two resident endpoints (reads 2P bytes, writes P);
- ``lerp_state_dict``: the one-line script: ``torch.lerp`` per tensor, then ``load_state_dict``;
- ``naive_state_dict``: ``alpha * lm + (1 - alpha) * vlm`` per tensor, then ``load_state_dict``;
- ``safetensors``: the naive state dict written with safetensors and read back before loading
  (the floor of any merge-to-disk-then-evaluate loop; from_pretrained adds model construction);
- ``copy``: ``dst.copy_(src)`` over the same tensors (reads P, writes P): the memory-bandwidth
  limit.

A whole sweep (``--sweep``; each a fresh Python process, so imports and first loads count): the
VLM and LM are written as checkpoints, then ``--alphas`` points are merged (no scoring) by

- ``babymerge``: merge's own path: load the VLM as the live model, read the LM's tensors, merge
  in place per alpha;
- ``lerp_script``: the same load, then ``torch.lerp`` + ``load_state_dict`` per alpha;
- ``mergekit_library`` (when ``--mergekit-python`` or this Python imports mergekit): mergekit's
  ``run_merge`` per alpha in one process, on the two checkpoints ``babymerge export``ed as Llama
  folders (mergekit does not know BabyLLaVA); it writes every merged model to disk, as it must;
- ``mergekit_cli`` (``--mergekit-cli``): ``mergekit-yaml`` once per alpha.

A sweep across processes (``--ranks N``): ``babymerge merge`` itself, scoring the built-in world's
minimal pairs (text only) at every alpha, as one process with every core and as ``torchrun
--nproc-per-node N`` with the cores shared out; the results must be the same.

mergekit's merged tensors are compared with ``torch.lerp`` of the exported tensors. Prints one
JSON object, with (on a GPU) the % of the memory's datasheet bandwidth. ``--quick`` (and the
default on CPU) uses the ``small`` preset.

Only the standard library is imported at the top: the mergekit drivers run in mergekit's own
Python (``--mergekit-python``), which need not have babymerge.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IDS = dict(image_token_id=4, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def timed(fns: dict, device, repeats: int) -> dict[str, float]:
    """Fastest of ``repeats`` calls of each function after one warm-up. The functions take turns
    (round robin) so that a burst of load on a shared machine hits all of them alike, and the
    minimum is the least disturbed measurement of a bandwidth-bound op."""
    from babymerge.benchmark import synchronize

    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - t0)
    return {name: min(t) for name, t in times.items()}


def one_alpha(preset: str, vocab: int, device, dtype, repeats: int) -> dict:
    """Part one: the step of one alpha, every path in this process."""
    import torch
    from safetensors.torch import load_file, save_file

    from babymerge import kernels
    from babymerge.benchmark import peak_bandwidth
    from babymerge.model import MODEL_PRESETS, build_model

    live = build_model(MODEL_PRESETS[preset], seed=0, vocab_size=vocab, **IDS).to(device, dtype)
    names = [n for n, _ in live.named_parameters()]
    params = [p.data for p in live.parameters()]
    lm = [torch.randn_like(p) for p in params]  # values do not matter to a bandwidth-bound op
    vlm = [p.clone() for p in params]
    nbytes = sum(p.numel() * p.element_size() for p in params)
    alpha = 0.3

    def inplace() -> None:
        kernels.interpolate_(params, lm, vlm, alpha)

    def naive() -> dict:
        return {n: alpha * a + (1 - alpha) * b for n, a, b in zip(names, lm, vlm)}

    def naive_state_dict() -> None:
        live.load_state_dict(naive(), strict=False)

    def lerp_state_dict() -> None:
        live.load_state_dict({n: torch.lerp(b, a, alpha) for n, a, b in zip(names, lm, vlm)},
                             strict=False)

    tmp = tempfile.mkdtemp()
    path = os.path.join(tmp, "merged.safetensors")

    def safetensors_round_trip() -> None:
        save_file({n: t.contiguous().cpu() for n, t in naive().items()}, path)
        live.load_state_dict({n: t.to(device) for n, t in load_file(path).items()}, strict=False)

    def copy() -> None:
        for d, s in zip(params, lm):
            d.copy_(s)

    # every path must make the same model, or the timings compare different work
    diffs = {}
    inplace()
    reference = [p.clone() for p in params]
    for name, fn in (("lerp_state_dict", lerp_state_dict),
                     ("naive_state_dict", naive_state_dict),
                     ("safetensors", safetensors_round_trip)):
        fn()
        diffs[name] = max(float((a - b).abs().max()) for a, b in zip(reference, params))
    seconds = timed({"inplace": inplace, "lerp_state_dict": lerp_state_dict,
                     "naive_state_dict": naive_state_dict, "safetensors": safetensors_round_trip,
                     "copy": copy}, device, repeats)
    shutil.rmtree(tmp)
    inplace_gbps = 3 * nbytes / seconds["inplace"] / 1e9
    copy_gbps = 2 * nbytes / seconds["copy"] / 1e9
    peak = peak_bandwidth(device)
    return {
        "params": sum(p.numel() for p in params), "param_bytes": nbytes,
        "seconds_per_alpha": seconds,
        "inplace_speedup": {k: v / seconds["inplace"] for k, v in seconds.items()
                            if k != "inplace"},
        "GBps": {"inplace (read 2P + write P)": inplace_gbps, "copy (read P + write P)": copy_gbps},
        "inplace_fraction_of_copy_bandwidth": inplace_gbps / copy_gbps,
        # % of the memory's datasheet bandwidth (None on a CPU or a GPU missing from the table)
        "peak_GBps": peak and peak / 1e9,
        "inplace_pct_of_peak_bandwidth": peak and 100 * inplace_gbps * 1e9 / peak,
        "copy_pct_of_peak_bandwidth": peak and 100 * copy_gbps * 1e9 / peak,
        "max_abs_diff_vs_inplace": diffs,
    }


# --- whole sweeps, each in a fresh process -----------------------------------------------------

def driver_babymerge(lm: str, vlm: str, alphas: list[float], device: str) -> dict:
    """merge's sweep without scoring: the VLM live, the LM's tensors resident, merged in place."""
    t0 = time.perf_counter()
    import torch

    from babymerge.merge_inputs import read_shapes, read_tensors
    from babymerge.merge_methods import MERGE_METHODS
    from babymerge.model import load_model
    t1 = time.perf_counter()
    dev = torch.device(device)
    model = load_model(vlm, dev)
    params = dict(model.named_parameters())
    names = [n for n in read_shapes(Path(lm)) if n in params]
    live = [params[n].data for n in names]
    method = MERGE_METHODS["linear"](read_tensors(Path(lm), names, dev, torch.float32),
                                     [p.detach().clone() for p in live], None)
    t2 = time.perf_counter()
    steps = []
    for alpha in alphas:
        s = time.perf_counter()
        method.merge_into_(live, alpha)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        steps.append(time.perf_counter() - s)
    return {"import_s": t1 - t0, "load_s": t2 - t1, "alpha_s": steps}


def driver_lerp(lm: str, vlm: str, alphas: list[float], device: str) -> dict:
    """The plain script: the same load, then torch.lerp and load_state_dict per alpha."""
    t0 = time.perf_counter()
    import torch
    from safetensors.torch import load_file

    from babymerge.model import load_model
    t1 = time.perf_counter()
    model = load_model(vlm, device)
    a = {k: v.to(device) for k, v in load_file(str(Path(lm) / "model.safetensors")).items()}
    b = {k: v.to(device) for k, v in load_file(str(Path(vlm) / "model.safetensors")).items()}
    t2 = time.perf_counter()
    steps = []
    for alpha in alphas:
        s = time.perf_counter()
        model.load_state_dict({k: torch.lerp(b[k], a[k], alpha) for k in a}, strict=False)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        steps.append(time.perf_counter() - s)
    return {"import_s": t1 - t0, "load_s": t2 - t1, "alpha_s": steps}


def mergekit_config(lm: str, vlm: str, alpha: float) -> dict:
    return {"merge_method": "linear", "dtype": "float32",
            "models": [{"model": lm, "parameters": {"weight": alpha}},
                       {"model": vlm, "parameters": {"weight": 1 - alpha}}]}


def driver_mergekit(lm: str, vlm: str, alphas: list[float], out: str) -> dict:
    """mergekit's library: run_merge per alpha in one process, each into ``out/alpha_<a>``."""
    t0 = time.perf_counter()
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    t1 = time.perf_counter()
    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True)
    steps = []
    for alpha in alphas:
        s = time.perf_counter()
        run_merge(MergeConfiguration.model_validate(mergekit_config(lm, vlm, alpha)),
                  str(Path(out) / f"alpha_{alpha}"), options)
        steps.append(time.perf_counter() - s)
    return {"import_s": t1 - t0, "load_s": 0.0, "alpha_s": steps}


DRIVERS = {"babymerge": driver_babymerge, "lerp_script": driver_lerp,
           "mergekit_library": driver_mergekit}


def run_driver(python: str, name: str, lm: Path, vlm: Path, alphas: list[float],
               last: str) -> dict:
    """One driver in a fresh ``python``: its own phases, and the wall time from the process
    start (the interpreter's start-up included) to its exit."""
    argv = [python, __file__, "--driver", name, "--driver-args",
            json.dumps([str(lm), str(vlm), alphas, last])]
    t0 = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"driver {name} failed:\n{done.stderr[-3000:]}")
    phases = json.loads(done.stdout.strip().splitlines()[-1])
    return {"wall_s": wall, **phases, "mean_alpha_s": sum(phases["alpha_s"]) / len(alphas)}


def mergekit_python(given: str | None) -> str | None:
    """The Python that runs mergekit: ``--mergekit-python``, else this one if it imports it."""
    if given:
        return given
    done = subprocess.run([sys.executable, "-c", "import mergekit"], capture_output=True)
    return sys.executable if done.returncode == 0 else None


def sweep(preset: str, vocab: int, device, alphas: list[float], python_mk: str | None,
          cli: bool) -> dict:
    """Part two: whole sweeps from a cold start, on checkpoints written for it."""
    import torch
    from safetensors.torch import load_file

    from babymerge.export import ExportConfig, export
    from babymerge.model import MODEL_PRESETS, build_model, save_black_feature, save_checkpoint

    root = Path(tempfile.mkdtemp())
    try:
        for seed, name in ((1, "vlm"), (2, "lm")):
            model = build_model(MODEL_PRESETS[preset], seed=seed, vocab_size=vocab, **IDS)
            black = torch.randn(MODEL_PRESETS[preset].feature_dim)
            save_checkpoint(model, root / name, _tokenizer(vocab),
                            write_extra=lambda d, b=black: save_black_feature(d, b))
        runs = {name: run_driver(sys.executable, name, root / "lm", root / "vlm", alphas,
                                 str(device)) for name in ("babymerge", "lerp_script")}
        result = {"alphas": alphas, "runs": runs}
        if python_mk is None:
            result["mergekit"] = "not run: no Python importing mergekit (--mergekit-python)"
            return result
        for name in ("lm", "vlm"):
            export(ExportConfig(checkpoint=root / name, out=root / f"{name}_llama"))
        lm_l, vlm_l = root / "lm_llama", root / "vlm_llama"
        runs["mergekit_library"] = run_driver(python_mk, "mergekit_library", lm_l, vlm_l,
                                              alphas, str(root / "mk"))
        if cli:
            runs["mergekit_cli"] = _mergekit_cli(python_mk, lm_l, vlm_l, alphas, root)
        # mergekit's merge against torch.lerp of the same exported tensors
        a = load_file(str(lm_l / "model.safetensors"))
        b = load_file(str(vlm_l / "model.safetensors"))
        alpha = alphas[len(alphas) // 2]
        theirs = {}
        for f in sorted((root / "mk" / f"alpha_{alpha}").glob("*.safetensors")):
            theirs.update(load_file(str(f)))
        common = sorted(set(theirs) & set(a))
        result["mergekit_check"] = {
            "alpha": alpha, "tensors_compared": len(common), "tensors_in_export": len(a),
            "max_abs_diff_vs_lerp": max(float((theirs[k] - torch.lerp(b[k], a[k], alpha))
                                              .abs().max()) for k in common)}
        base = runs["babymerge"]
        result["ratios_to_babymerge"] = {
            name: {"wall": r["wall_s"] / base["wall_s"],
                   "mean_alpha": r["mean_alpha_s"] / base["mean_alpha_s"]}
            for name, r in runs.items() if name != "babymerge"}
        return result
    finally:
        shutil.rmtree(root, ignore_errors=True)


def ranks_sweep(preset: str, ranks: int, alphas: str, pairs: int) -> dict:
    """Part three: the real ``babymerge merge`` command, one process against ``ranks``."""
    import torch

    from babymerge.model import MODEL_PRESETS, build_model, save_black_feature, save_checkpoint
    from babymerge.tokenizer import TokenizerConfig, load_tokenizer, train_tokenizer
    from babymerge.world import WorldConfig, generate_world

    root = Path(tempfile.mkdtemp())
    try:
        world = generate_world(WorldConfig(train_images=8, eval_images=8, text_words=20_000,
                                           pairs_per_phenomenon=pairs), root / "world",
                               progress=False)
        with contextlib.redirect_stdout(io.StringIO()):  # its summary line is not ours to print
            train_tokenizer(TokenizerConfig(corpus=[world.corpus], out=root / "tok",
                                            vocab_size=2000, progress=False))
        tok = load_tokenizer(root / "tok")
        ids = dict(vocab_size=len(tok), image_token_id=tok.convert_tokens_to_ids("<image>"),
                   pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                   eos_token_id=tok.eos_token_id)
        for seed, name in ((1, "vlm"), (2, "lm")):
            black = torch.randn(MODEL_PRESETS[preset].feature_dim)
            save_checkpoint(build_model(MODEL_PRESETS[preset], seed=seed, **ids), root / name,
                            tok, write_extra=lambda d, b=black: save_black_feature(d, b))
        args = ["merge", "--lm", str(root / "lm"), "--vlm", str(root / "vlm"), "-t",
                f"minimal_pairs:{world.minimal_pairs}", "--alpha-grid", alphas, "--keep", "none",
                "--bootstrap", "0", "--no-progress", "--device", "cpu"]
        cores = os.cpu_count() or 1
        timings, results = {}, {}
        for name, n in (("one_process", 1), (f"torchrun_{ranks}", ranks)):
            launcher = ([] if n == 1 else
                        ["-m", "torch.distributed.run", "--nproc-per-node", str(n),
                         "--master-port", str(29500 + os.getpid() % 1000)])
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // n))}
            t0 = time.perf_counter()
            subprocess.run([sys.executable, *launcher, "-m", "babymerge.cli", *args, "--out",
                            str(root / name)], env=env, check=True, capture_output=True)
            timings[name] = time.perf_counter() - t0
            results[name] = json.loads((root / name / "results.json").read_text())
        scores = {name: [r["scores"] for r in res["records"]] for name, res in results.items()}
        one, many = timings["one_process"], timings[f"torchrun_{ranks}"]
        tasks = results["one_process"]["tasks"].values()
        return {"ranks": ranks, "cores": cores, "items": sum(t["items"] for t in tasks),
                "points": len(results["one_process"]["records"]), "wall_s": timings,
                "speedup": one / many, "same_scores": len({json.dumps(v) for v in
                                                           scores.values()}) == 1}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _tokenizer(vocab: int):
    """A tokenizer of ``vocab`` entries with BabyLLaVA's specials (export needs one; its merges
    do not matter to a timing)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
    vocab_map = {t: i for i, t in enumerate(specials)}
    vocab_map.update({f"w{i}": i for i in range(len(specials), vocab)})
    tok = Tokenizer(models.WordLevel(vocab_map, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>",
                                   additional_special_tokens=["<image>"])


def _mergekit_cli(python: str, lm: Path, vlm: Path, alphas: list[float], root: Path) -> dict:
    """``mergekit-yaml`` once per alpha, as a user running the tool per point would."""
    import yaml

    script = Path(python).parent / "mergekit-yaml"
    steps = []
    t0 = time.perf_counter()
    for alpha in alphas:
        cfg = root / f"mk_{alpha}.yml"
        cfg.write_text(yaml.safe_dump(mergekit_config(str(lm), str(vlm), alpha)))
        s = time.perf_counter()
        subprocess.run([str(script), str(cfg), str(root / "mk_cli" / f"alpha_{alpha}"),
                        "--no-copy-tokenizer", "--no-write-model-card", "--quiet"],
                       check=True, capture_output=True)
        steps.append(time.perf_counter() - s)
    return {"wall_s": time.perf_counter() - t0, "alpha_s": steps,
            "mean_alpha_s": sum(steps) / len(steps)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=None,
                        help="model size (default: paper on CUDA, small on CPU)")
    parser.add_argument("--vocab", type=int, default=30000)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="small preset, 5 repeats")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--sweep", action="store_true",
                        help="also time whole sweeps from a cold start (fresh processes)")
    parser.add_argument("--alphas", default="0:1:0.1", help="the sweep's grid")
    parser.add_argument("--mergekit-python", default=None,
                        help="a Python with mergekit installed (default: this one, if it has it)")
    parser.add_argument("--mergekit-cli", action="store_true",
                        help="also time mergekit-yaml once per alpha (slow: a process each)")
    parser.add_argument("--ranks", type=int, default=0,
                        help="also time `babymerge merge` as one process and under torchrun "
                        "with this many ranks (CPU: the cores shared out)")
    parser.add_argument("--pairs", type=int, default=50,
                        help="--ranks: minimal pairs per UID of the world scored at each alpha")
    parser.add_argument("--driver", help=argparse.SUPPRESS)
    parser.add_argument("--driver-args", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.driver:  # inside a fresh process started by run_driver
        print(json.dumps(DRIVERS[args.driver](*json.loads(args.driver_args))))
        return {}

    import torch

    from babymerge.benchmark import environment
    from babymerge.merge_inputs import parse_alpha_grid
    from babymerge.model import MODEL_PRESETS

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                          if args.device == "auto" else args.device)
    preset = args.preset or ("small" if args.quick or device.type == "cpu" else "paper")
    if preset not in MODEL_PRESETS:
        parser.error(f"--preset {preset}: one of {', '.join(sorted(MODEL_PRESETS))}")
    repeats = args.repeats or (5 if args.quick else 10)
    result = {"bench": "merge", **environment(device),
              "kernel_path": os.environ.get("BABYMERGE_KERNELS", "auto"), "preset": preset,
              "vocab": args.vocab, "dtype": args.dtype, "repeats": repeats,
              **one_alpha(preset, args.vocab, device, getattr(torch, args.dtype), repeats)}
    if args.sweep:
        result["sweep"] = sweep(preset, args.vocab, device, parse_alpha_grid(args.alphas, False),
                                mergekit_python(args.mergekit_python), args.mergekit_cli)
    if args.ranks:
        result["ranks_sweep"] = ranks_sweep(preset, args.ranks, args.alphas, args.pairs)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
