"""``babymerge demo``: the paper's whole experiment on the built-in world, offline, on a CPU.

Every step is the real stage function with its own config (nothing here re-implements a stage):

1. generate the world (:mod:`babymerge.world`): scenes, captions, text corpus, evaluation sets;
2. save a small **randomly initialised** DINOv2-architecture encoder (no hub access; the report
   says so) and ``extract_features`` of every scene and the black image;
3. ``train_tokenizer`` on the text corpus;
4. ``train`` the text-only LM and the VLM (text + captions) from the same initial weights;
5. ``merge`` them over ``--alpha-grid 0:1:0.1``, scoring every eval set at every point;
6. report: the results table, the plot's path, time per stage, and whether the paper's finding
   (the VLM is weaker on grammar; merging recovers some of it while keeping multimodal scores)
   holds on this run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import click

from babymerge.config import InputError, atomic_write_text, opt, output_folder, save_config
from babymerge.features import ExtractConfig, extract_features, save_random_dinov2
from babymerge.merge import MergeConfig, merge
from babymerge.merge_resume import read_metrics
from babymerge.model import transformers_bars_off
from babymerge.tokenizer import TokenizerConfig, train_tokenizer
from babymerge.train import RESUME_DIR, TrainConfig, read_resume_state, train
from babymerge.world import WorldConfig, generate_world

ALPHA_GRID = "0:1:0.1"
# Steps between resume saves in the demo's training runs (the tiny-scale VLM runs ~640 steps; a
# save of these models takes well under a second).
DEMO_SAVE_EVERY = 100


@dataclass(frozen=True)
class EncoderSize:
    """The random stand-in for DINOv2-large (``save_random_dinov2`` arguments).

    At DINOv2's own initializer_range (0.02) a random encoder's blocks are almost linear and its
    mean-pooled feature keeps little more than the image's mean colour, which a background's
    tint swamps; at 0.2 a linear probe on 1,200 scenes reads which colours are present (86% vs
    69% majority) and which colour goes with which shape (76% vs 23%). Shape and position stay
    near chance for every random size tried (hidden 64-256, 1-3 blocks, patch 4-14). The
    feature's norm is ~72 at 0.2 (tiny and base worlds), so the models standardise it
    (``feature_norm`` in :func:`_train_config`); on the raw feature the VLM learned to ignore the
    image.
    """

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    patch_size: int = 14
    image_size: int = 112
    initializer_range: float = 0.2


@dataclass(frozen=True)
class Scale:
    """Everything a demo size sets: the world, the encoder, the model preset and training."""

    world: WorldConfig
    encoder: EncoderSize
    preset: str
    vocab_size: int
    seq_len: int
    batch_size: int
    lm_epochs: int
    vlm_epochs: int
    lr: float
    warmup_steps: int
    eval_batch_size: int = 128
    # "budget": the VLM reads only as much of the text as its captions leave of the LM's word
    # budget, as in the paper (50M text + 50M caption words: half of the VLM's words are
    # captions); "all": the whole text and the captions on top (no grammar deficit: measured)
    vlm_text: str = "budget"


# Tokens: vocab 600 gives every word of the world one token (the rest are bytes and specials).
# Caption batches are short (~15 tokens), text batches full (seq_len): captions are cheap steps,
# so the VLM sees each scene under several captions.
SCALES: dict[str, Scale] = {
    # the end-to-end test: about a minute of compute on 2 cores
    "tiny": Scale(world=WorldConfig(train_images=800, eval_images=200, captions_per_image=4,
                                    text_words=50_000, pairs_per_phenomenon=30),
                  encoder=EncoderSize(), preset="tiny", vocab_size=600, seq_len=64,
                  batch_size=32, lm_epochs=3, vlm_epochs=5, lr=3e-3, warmup_steps=20),
    # the README's command: under 5 minutes on 2 CPU cores
    "small": Scale(world=WorldConfig(text_words=100_000, captions_per_image=4),
                   encoder=EncoderSize(), preset="tiny", vocab_size=600, seq_len=64,
                   batch_size=32, lm_epochs=4, vlm_epochs=4, lr=3e-3, warmup_steps=50),
    # a clearer curve for those with ~20 minutes
    "base": Scale(world=WorldConfig(train_images=6000, eval_images=600, text_words=600_000,
                                    pairs_per_phenomenon=300),
                  encoder=EncoderSize(), preset="small", vocab_size=600, seq_len=64,
                  batch_size=32, lm_epochs=4, vlm_epochs=4, lr=1e-3, warmup_steps=100),
}


@dataclass
class DemoConfig:
    """``babymerge demo [--out DIR] [--scale tiny|small|base]``."""

    out: Path = opt(Path("demo_run"), "run folder: world, encoder, features, models, merge, report")
    scale: str = opt("small", "size of the world and the models (small: < 5 minutes on 2 CPU "
                     "cores; tiny: the test's; base: 49 minutes on 2 busy cores)",
                     choices=tuple(SCALES))
    seed: int = opt(0, "seed of the world, the encoder and both models' shared initial weights")
    device: str = opt("auto", "cpu, cuda, or auto (cuda when available)",
                      choices=("auto", "cpu", "cuda"))
    progress: bool = opt(True, "show each stage's progress bar")

    def __post_init__(self) -> None:
        if self.scale not in SCALES:
            raise ValueError(f"--scale must be one of {', '.join(SCALES)}, got {self.scale!r}")


@dataclass
class StageTimer:
    """Wall time and (where the stage reports one) throughput of each stage."""

    stages: dict[str, dict] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[dict]:
        click.echo(f"== {name}", err=True)
        info: dict = {}
        t0 = time.perf_counter()
        yield info
        info["seconds"] = round(time.perf_counter() - t0, 2)
        self.stages[name] = info

    @property
    def total(self) -> float:
        return round(sum(s["seconds"] for s in self.stages.values()), 2)


def _vlm_text(scale: Scale, world) -> Path:
    """The text the VLM reads: the whole corpus, or (``vlm_text="budget"``) its first lines up to
    the LM's word count minus the captions' words, written beside the corpus."""
    if scale.vlm_text == "all":
        return world.corpus
    lines = world.corpus.read_text(encoding="utf-8").splitlines()
    captions = sum(len(json.loads(r)["caption"].split())
                   for r in world.captions.read_text(encoding="utf-8").splitlines() if r.strip())
    budget, words, kept = sum(len(line.split()) for line in lines) - captions, 0, []
    if budget <= 0:
        raise ValueError(f"the captions' {captions} words exceed the text's: no text is left "
                         "for the VLM under an equal word budget")
    for line in lines:
        if words >= budget:
            break
        kept.append(line)
        words += len(line.split())
    path = world.corpus.with_name("corpus_vlm.txt")
    atomic_write_text(path, "\n".join(kept) + "\n")
    return path


def _train_config(cfg: DemoConfig, scale: Scale, kind: str, run: Path, world, features: Path,
                  tokenizer: Path) -> TrainConfig:
    text = _vlm_text(scale, world) if kind == "vlm" else world.corpus
    return TrainConfig(
        kind=kind, text=[text], captions=[world.captions] if kind == "vlm" else [],
        features=features, tokenizer=tokenizer, out=run / kind, preset=scale.preset,
        seed=cfg.seed, seq_len=scale.seq_len, batch_size=scale.batch_size,
        epochs=scale.lm_epochs if kind == "lm" else scale.vlm_epochs, lr=scale.lr,
        warmup_steps=scale.warmup_steps, device=cfg.device,
        # no BabyLM word-count checkpoints (the world has far fewer than 1M words): only the
        # final model, as the merge needs. The resume state is saved every DEMO_SAVE_EVERY steps
        # so that an interrupted demo's rerun goes on from there (with no periodic save, the
        # VLM's minutes of training at the default scale were all redone).
        checkpoint_unit=10**12, save_every=DEMO_SAVE_EVERY, log_every=20,
        cache_dir=run / "cache" / "tokens",
        # A random encoder's pooled features share one large offset (norm ~72, spreads of ~1.3
        # per dimension): on raw features the VLM learned to ignore the image (Winoground at
        # chance); z-scored features take it to 0.71 / VQA 0.46 on the small world (README).
        feature_norm="standardize",
        progress=cfg.progress)


def _per_second(work: float, seconds: float) -> float | None:
    """Throughput of the work this run did; None when it did none (a re-run into a finished
    folder reuses every stage's output, and the earlier run's work over this run's seconds would
    be no throughput at all)."""
    return round(work / seconds, 1) if work > 0 and seconds > 0 else None


def _trained_tokens(run_dir: Path) -> int:
    """Tokens an earlier run in ``run_dir`` already trained on (its resume state; 0 if none):
    ``train`` resumes from there, or does nothing if that run finished."""
    state = read_resume_state(run_dir / RESUME_DIR)
    return int(state["tokens"]) if state else 0


def _logged_points(merge_dir: Path) -> int:
    """Merge points logged in ``merge_dir/metrics.jsonl`` (a re-run reuses them rather than
    scoring them again), as merge reads them; unmerged endpoint scores are not points."""
    return sum("endpoint" not in r for r in read_metrics(merge_dir / "metrics.jsonl"))


def _train_throughput(run_dir: Path) -> dict:
    """Tokens, words and tokens/s of a finished training run, from its metrics.jsonl."""
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r]
    last = steps[-1]
    return {"steps": last["step"], "tokens": last["tokens"], "words": last["words"],
            "final_loss": last["loss"]}


def finding(results: dict) -> tuple[bool, str]:
    """Whether the paper's finding holds on this run, as one sentence.

    The finding: the VLM (alpha = 0) is weaker on grammar than the LM (alpha = 1), and a merge
    0 < alpha < 1 recovers part of that grammar while keeping most of the VLM's multimodal lead
    over the LM. Every claim is a paired-bootstrap interval of the report items (merge's
    ``intervals``) that excludes 0: the VLM minus the LM on grammar below 0, the merge minus the
    VLM on grammar above 0, the merge minus the LM on multimodal above 0, with at least half of
    the VLM's multimodal lead kept. The merge is picked on the selection items (``--select-on
    half``), so the report items that judge it did not choose it: the one doing both best, whose
    smaller share (of the grammar gap recovered, of the multimodal lead kept) is largest. (Two
    standard errors of independent proportions, the rule before, ignored that both models
    answer the same items.)
    """
    recs = {r["alpha"]: r for r in results["records"]}
    vlm, lm = recs[0.0], recs[1.0]
    if "grammar" not in vlm or "multimodal" not in vlm or "intervals" not in vlm:
        return False, ("The paper's finding cannot be checked: grammar and multimodal tasks, and "
                       "merge's bootstrap intervals, are all needed.")
    gap = vlm["intervals"]["vs_lm"]["grammar"]
    shown = f"{vlm['grammar']:.3f} vs {lm['grammar']:.3f}"
    if gap["high"] >= 0:
        if gap["diff"] < 0:
            return False, (f"The paper's finding cannot be seen on this run: the VLM and the LM "
                           f"are equally good on grammar ({shown}; the 95% interval of their "
                           f"difference, [{gap['low']:+.3f}, {gap['high']:+.3f}], includes 0).")
        return False, (f"The paper's finding does not hold on this run: the VLM is not weaker on "
                       f"grammar than the LM ({shown}).")

    def balance(r: dict) -> float:
        """On the selection items: the smaller of the share of the grammar gap the merge
        recovers and the share of the multimodal lead it keeps (a merge doing both well)."""
        here, v, m = (x.get("selection", x) for x in (r, vlm, lm))
        gap, lead = m["grammar"] - v["grammar"], v["multimodal"] - m["multimodal"]
        if gap <= 0 or lead <= 0:
            return float("-inf")
        return min((here["grammar"] - v["grammar"]) / gap,
                   (here["multimodal"] - m["multimodal"]) / lead)

    best = max((r for a, r in sorted(recs.items()) if 0 < a < 1),
               key=lambda r: (balance(r), -r["alpha"]), default=None)
    lead = vlm["multimodal"] - lm["multimodal"]
    if best is not None:
        gain = best["intervals"]["vs_vlm"]["grammar"]
        above_lm = best["intervals"]["vs_lm"]["multimodal"]
        kept = (best["multimodal"] - lm["multimodal"]) / lead if lead > 0 else 0.0
        if gain["low"] > 0 and above_lm["low"] > 0 and kept >= 0.5:
            recovered = gain["diff"] / -gap["diff"]
            return True, (f"The paper's finding holds on this run: the VLM is weaker on grammar "
                          f"than the LM ({shown}), and merging at alpha = {best['alpha']} "
                          f"recovers {min(recovered, 1.0):.0%} of the gap ({best['grammar']:.3f},"
                          f" +{gain['diff']:.3f} [{gain['low']:+.3f}, {gain['high']:+.3f}]) while "
                          f"keeping {kept:.0%} of the multimodal lead over the LM "
                          f"({best['multimodal']:.3f}; VLM {vlm['multimodal']:.3f}, LM "
                          f"{lm['multimodal']:.3f}).")
    return False, (f"The paper's finding holds only in part on this run: the VLM is weaker on "
                   f"grammar than the LM ({shown}), but no merge improves grammar beyond the "
                   f"noise (95% interval above 0) while keeping half of the multimodal lead "
                   f"({vlm['multimodal']:.3f} vs the LM's {lm['multimodal']:.3f}).")


def groups_paragraph(results: dict) -> str:
    """What the per-group search found: its best point against the chosen uniform alpha (report
    items), the groups that moved grammar most alone, and where the Pareto plot is."""
    g = results.get("groups")
    if not g:
        return "(no per-group search)"
    best = next(p for p in g["points"] if p["best"])
    chosen = next(r for r in results["records"] if r["alpha"] == results["chosen_alpha"])
    alphas = ", ".join(f"{k}={v:g}" for k, v in best["group_alphas"].items())
    reach = ", ".join(f"{k} {v:.3f}" for k, v in list(g["sensitivity"].items())[:3])
    front = len(g["pareto"])
    return (f"per-group alphas ({g['spec']}): the search's best point ({alphas}) scores grammar "
            f"{best['grammar']:.3f} and multimodal {best['multimodal']:.3f}, against "
            f"{chosen['grammar']:.3f} and {chosen['multimodal']:.3f} at the chosen uniform alpha "
            f"{chosen['alpha']}; alone, {reach} moved grammar most; {front} point(s) on the "
            f"Pareto front (pareto.png beside the results).")


def results_table(results: dict) -> str:
    """Score per task for every alpha, chance in the header row (plain text, fixed width)."""
    names = list(results["tasks"])
    cols = names + ["grammar", "multimodal"]
    head = f"{'alpha':>7} " + " ".join(f"{c:>18}" for c in cols)
    chance = f"{'chance':>7} " + " ".join(
        f"{results['tasks'][c]['chance']:>18.3f}" if c in results["tasks"] else f"{'':>18}"
        for c in cols)
    lines = [head, chance]
    for r in results["records"]:
        mark = " <- chosen" if r["alpha"] == results["chosen_alpha"] else ""
        label = {0.0: "0 VLM", 1.0: "1 LM"}.get(r["alpha"], f"{r['alpha']:g}")
        vals = [r["scores"].get(c, r.get(c)) for c in cols]
        lines.append(f"{label:>7} " + " ".join(f"{v:>18.4f}" for v in vals) + mark)
    return "\n".join(lines)


def _check_demo_folder(run: Path) -> None:
    """The demo writes world/, encoder/, run/ ... into --out, over whatever has those names: only
    a new or empty folder, or one an earlier demo started (its demo_config.json), is used."""
    if (run / "demo_config.json").is_file():
        return
    found = sorted(p.name for p in run.iterdir())
    if found:
        shown = ", ".join(found[:5]) + (" ..." if len(found) > 5 else "")
        raise InputError(f"--out {run}: holds files no demo wrote ({shown}); give a new or empty "
                         "folder")


def _check_same_demo(path: Path, cfg: DemoConfig, scale: Scale) -> None:
    """Refuse a rerun into a folder of a demo with another scale or seed, before anything is
    overwritten: each stage reuses what the folder holds, so the world and the tokenizer were
    regenerated for the new settings and then ``train`` refused the old models with a hint
    (``--no-resume``) that the demo does not have."""
    if not path.is_file():
        return
    old = json.loads(path.read_text(encoding="utf-8"))
    before = {"scale": old["config"].get("scale"), "seed": old["config"].get("seed")}
    now = {"scale": cfg.scale, "seed": cfg.seed}
    # a custom Scale (scripts/bench_pipeline.py) under a preset's name differs in its settings
    if before["scale"] == now["scale"] and "scale_settings" in old and old[
            "scale_settings"] != json.loads(json.dumps(dataclasses.asdict(scale))):
        before["scale"] = f"{before['scale']} (other settings)"
    if before != now:
        changed = ", ".join(f"--{k} {before[k]} -> {now[k]}" for k in now if before[k] != now[k])
        raise InputError(f"--out {path.parent} holds a demo run with other settings ({changed}); "
                         "its stages would be reused or refused: give a new --out, or the same "
                         "settings to resume it")


def demo(cfg: DemoConfig) -> dict:
    """Run the whole pipeline in ``cfg.out``; print and write the report; return its content."""
    # --no-progress: transformers' bars (loading and writing checkpoints) are silenced as well
    with contextlib.nullcontext() if cfg.progress else transformers_bars_off():
        return run_demo(cfg, SCALES[cfg.scale])


def run_demo(cfg: DemoConfig, scale: Scale) -> dict:
    """:func:`demo` at any :class:`Scale` (the benchmark passes its own quick one)."""
    run = output_folder(Path(cfg.out))
    _check_demo_folder(run)
    _check_same_demo(run / "demo_config.json", cfg, scale)
    save_config(cfg, run / "demo_config.json", scale_settings=dataclasses.asdict(scale))
    timer = StageTimer()
    world_cfg = dataclasses.replace(scale.world, seed=cfg.seed)

    with timer.stage("world") as info:
        world = generate_world(world_cfg, run / "world", progress=cfg.progress)
        counts = json.loads(world.manifest.read_text())["world"]["counts"]
        info.update(counts)

    with timer.stage("encoder") as info:
        enc = scale.encoder
        encoder_dir = save_random_dinov2(run / "encoder", hidden_size=enc.hidden_size,
                                         num_layers=enc.num_layers, num_heads=enc.num_heads,
                                         patch_size=enc.patch_size, image_size=enc.image_size,
                                         seed=cfg.seed, initializer_range=enc.initializer_range)
        info["note"] = ("randomly initialised DINOv2 architecture (not facebook/dinov2-large): "
                        + ", ".join(f"{k}={v}" for k, v in enc.__dict__.items()))

    features = run / "features.h5"
    with timer.stage("extract-features") as info:
        # 0 workers: at 112 px decoding is cheaper than starting a worker process on 2 cores
        summary = extract_features(ExtractConfig(
            source=str(world.images), out=features, encoder=str(encoder_dir), batch_size=128,
            device=cfg.device, dtype="float32", num_workers=0, progress=cfg.progress))
        encoded = summary["new"] + summary["new_failed"]
        info.update(images=summary["rows"], encoded=encoded, reused=encoded == 0,
                    images_per_s=summary["images_per_s"] if encoded else None)

    with timer.stage("tokenizer") as info:
        tok = train_tokenizer(TokenizerConfig(corpus=[world.corpus], out=run / "tokenizer",
                                              vocab_size=scale.vocab_size, progress=False))
        info.update({k: v for k, v in tok.items() if isinstance(v, (int, float, str))})

    for kind in ("lm", "vlm"):
        before = _trained_tokens(run / kind)
        with timer.stage(f"train {kind}") as info:
            out = train(_train_config(cfg, scale, kind, run, world, features, run / "tokenizer"))
            info.update(_train_throughput(out))
        info["trained_tokens"] = info["tokens"] - before
        info["tokens_per_s"] = _per_second(info["trained_tokens"], info["seconds"])
        info["reused"] = info["trained_tokens"] == 0

    points_before = _logged_points(run / "merge")
    with timer.stage("merge") as info:
        # chosen on half the items, reported and judged on the other half (finding)
        results = merge(MergeConfig(lm=run / "lm", vlm=[run / "vlm"], alpha_grid=ALPHA_GRID,
                                    task=world.task_specs(), features=features,
                                    out=run / "merge", keep="chosen", device=cfg.device,
                                    batch_size=scale.eval_batch_size, select_on="half",
                                    select_seed=cfg.seed, groups="kind", group_rounds=2,
                                    progress=cfg.progress))
        info.update(alphas=len(results["records"]),
                    items_per_alpha=sum(t["items"] for t in results["tasks"].values()))
    info["scored_alphas"] = _logged_points(run / "merge") - points_before
    info["items_per_s"] = _per_second(info["scored_alphas"] * info["items_per_alpha"],
                                      info["seconds"])
    info["reused"] = info["scored_alphas"] == 0

    holds, sentence = finding(results)
    table = results_table(results)
    plot = run / "merge" / "alpha_curve.png"
    report = {"scale": cfg.scale, "holds": holds, "finding": sentence,
              "encoder": timer.stages["encoder"]["note"], "stages": timer.stages,
              "total_seconds": timer.total, "results": str(run / "merge" / "results.json"),
              "plot": str(plot), "chosen_alpha": results["chosen_alpha"]}
    timing = "\n".join(f"  {name:<18} {s['seconds']:>8.1f} s"
                       + ("  (done by an earlier run: reused)" if s.get("reused") else "")
                       for name, s in timer.stages.items())
    text = (f"babymerge demo ({cfg.scale} scale) in {run}\n"
            f"encoder: {report['encoder']}\n\n"
            f"accuracy per alpha (alpha = 1 - weight of the VLM; 0 = VLM, 1 = LM)\n{table}\n\n"
            f"{sentence}\n\n{groups_paragraph(results)}\n\n"
            f"plot: {plot}\nresults: {report['results']}\n\n"
            f"time per stage\n{timing}\n  {'total':<18} {timer.total:>8.1f} s\n")
    atomic_write_text(run / "report.txt", text)
    atomic_write_text(run / "report.json", json.dumps(report, indent=2) + "\n")
    click.echo("\n" + text)
    return report
