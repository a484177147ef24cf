"""babymerge.merge_stats: the selection split (per UID, seeded, disjoint), merge --select-on half
(chosen on one half, the other half's scores reported, each equal to `eval` of a file of just
those items), and the paired bootstrap intervals (against a bootstrap that resamples items one
by one)."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from babymerge.evaluate import EvalConfig, aggregate_groups, evaluate, spearman
from babymerge.merge import MergeConfig, merge
from babymerge.merge_report import objective
from babymerge.merge_stats import (decode_outcomes, encode_outcomes, paired_interval,
                                   split_items)
from fixtures import eval_world  # noqa: F401  (fixture)


def fake_task(name, groups, kind="minimal_pairs", ratios=None):
    metric = "spearman" if ratios is not None else "accuracy"
    return SimpleNamespace(name=name, kind=kind, groups=groups, num_items=len(groups),
                           metric=metric, ratios=ratios)


def test_half_split_is_per_uid_disjoint_seeded_and_independent_of_other_tasks():
    groups = ["a"] * 7 + ["b"] * 10 + ["c"]
    task = fake_task("t", groups)
    split = split_items([task], "half", seed=0)
    select, report = split.select["t"], split.report["t"]
    assert sorted(select + report) == list(range(18)) and not set(select) & set(report)
    for g, n in (("a", 7), ("b", 10), ("c", 1)):
        assert sum(groups[i] == g for i in select) == n // 2  # the odd item goes to the report
    assert split_items([task], "half", seed=0) == split
    assert split_items([task], "half", seed=1).select["t"] != select
    other = fake_task("u", ["x"] * 20)
    assert split_items([other, task], "half", seed=0).select["t"] == select
    every = split_items([task], "all", seed=0)
    assert every.select["t"] == every.report["t"] == list(range(18))


@pytest.mark.parametrize("kind", ["minimal_pairs", "wug_adj"])
def test_outcomes_survive_their_encoding(kind):
    rng = np.random.default_rng(0)
    n = 1001  # not a multiple of 8: the padding bits are cut off
    task = fake_task("t", ["g"] * n, ratios=list(rng.random(n)) if kind == "wug_adj" else None)
    values = (rng.random(n) < 0.5).astype(float) if kind == "minimal_pairs" else rng.random(n)
    encoded = json.loads(json.dumps(encode_outcomes(task, list(values))))
    np.testing.assert_array_equal(decode_outcomes(task, encoded), values)


def _brute_bootstrap(tasks, ours, theirs, summary, groups, replicates, rng):
    """Differences of every task, group and the objective, resampling items one by one within
    each UID (the definition the multinomial draw is a shortcut of)."""
    drawn = {t.name: np.empty(replicates) for t in tasks}
    for r in range(replicates):
        for t in tasks:
            if t.metric == "spearman":
                idx = rng.integers(0, t.num_items, t.num_items)
                ratios = np.asarray(t.ratios)[idx]
                drawn[t.name][r] = (spearman(ours[t.name][idx], ratios)
                                    - spearman(theirs[t.name][idx], ratios))
                continue
            diffs = {}
            for g in dict.fromkeys(t.groups):
                members = np.flatnonzero(np.asarray(t.groups) == g)
                idx = members[rng.integers(0, len(members), len(members))]
                diffs[g] = ours[t.name][idx].mean() - theirs[t.name][idx].mean()
            drawn[t.name][r] = aggregate_groups(t.kind, diffs)
    return {**drawn, **objective(drawn, summary, groups)}


def test_paired_intervals_match_resampling_items_one_by_one():
    rng = np.random.default_rng(0)
    tasks = [fake_task("blimp", ["u1"] * 40 + ["u2"] * 120 + ["u3"] * 9),
             fake_task("et", ["regular_a"] * 30 + ["regular_b"] * 20 + ["ambiref_a"] * 25,
                       kind="entity_tracking"),
             fake_task("wug", ["wug"] * 60, kind="wug_adj", ratios=list(rng.random(60)))]
    summary = {t.name: {"kind": t.kind} for t in tasks}
    groups = {"grammar": ("minimal_pairs", "entity_tracking"), "wug": ("wug_adj",)}
    ours, theirs = {}, {}
    for t in tasks:
        if t.metric == "spearman":
            base = np.asarray(t.ratios) + rng.normal(0, 0.3, t.num_items)
            ours[t.name], theirs[t.name] = base + rng.normal(0, 0.2, 60), base
        else:  # correlated outcomes, ours a little better: a paired design's case
            theirs[t.name] = (rng.random(t.num_items) < 0.7).astype(float)
            flip = rng.random(t.num_items) < 0.25
            ours[t.name] = np.where(flip, (rng.random(t.num_items) < 0.85), theirs[t.name])
    items = {t.name: list(range(t.num_items)) for t in tasks}
    rec = {"items": {t.name: encode_outcomes(t, list(ours[t.name])) for t in tasks}}
    other = {"items": {t.name: encode_outcomes(t, list(theirs[t.name])) for t in tasks}}
    got = paired_interval(rec, other, tasks, items, summary, groups, replicates=4000, seed=0)
    brute = _brute_bootstrap(tasks, ours, theirs, summary, groups, 4000,
                             np.random.default_rng(1))
    assert set(got) == {"blimp", "et", "wug", "grammar", "objective"}
    for name, values in brute.items():
        low, high = np.nanpercentile(values, [2.5, 97.5])
        width = high - low
        assert got[name]["low"] == pytest.approx(low, abs=0.08 * width), name
        assert got[name]["high"] == pytest.approx(high, abs=0.08 * width), name
        assert got[name]["low"] <= got[name]["diff"] <= got[name]["high"]
    itself = paired_interval(rec, rec, tasks, items, summary, groups, replicates=100, seed=0)
    assert all(v == {"diff": 0.0, "low": 0.0, "high": 0.0} for v in itself.values())


def _write_subset(spec: str, item_indices: list[int], folder: Path) -> str:
    """The task ``spec`` (KIND:PATH) as files holding only the items ``item_indices``, in the
    order babymerge reads them (a folder's *.jsonl sorted by name, then line by line)."""
    kind, _, path = spec.partition(":")
    path = Path(path)
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    lines = [(f.name, line) for f in files for line in f.read_text().splitlines() if line.strip()]
    folder.mkdir(parents=True)
    keep = set(item_indices)
    for name in dict.fromkeys(n for n, _ in lines):
        chosen = [line for i, (n, line) in enumerate(lines) if n == name and i in keep]
        (folder / name).write_text("".join(line + "\n" for line in chosen))
    return f"{kind}:{folder if path.is_dir() else folder / path.name}"


def test_select_on_half_chooses_on_one_half_and_reports_what_eval_gives_on_the_other(
        eval_world, tmp_path):
    world = eval_world
    specs = dict(world.specs)
    results = merge(MergeConfig(lm=world.lm, vlm=[world.vlm], features=world.features,
                                task=[f"{n}={s}" for n, s in specs.items()], out=tmp_path / "m",
                                alpha_grid="0,0.5,1", keep="0,0.5,1", select_on="half",
                                bootstrap=200, progress=False))
    sel = results["selection"]
    assert sel["on"] == "half" and sel["items"]["blimp"] == {"select": 12, "report": 12}
    split = split_items_of(results, world, specs)
    objectives = {}
    for rec in results["records"]:
        model = tmp_path / "m" / f"alpha_{rec['alpha']}"
        for half, key in (("report", None), ("select", "selection")):
            spec = [f"{n}=" + _write_subset(s, getattr(split, half)[n],
                                            tmp_path / f"{rec['alpha']}_{half}_{n}")
                    for n, s in specs.items()]
            got = evaluate(EvalConfig(model=model, task=spec, features=world.features,
                                      progress=False))["scores"]
            want = rec["scores"] if key is None else rec[key]["scores"]
            assert got == pytest.approx(want), (rec["alpha"], half)
        objectives[rec["alpha"]] = rec["selection"]["objective"]
        assert set(rec["intervals"]) == {"vs_vlm", "vs_lm"}
    best = max(objectives.values())
    assert results["chosen_alpha"] == min(a for a, o in objectives.items() if o >= best - 1e-9)
    md = (tmp_path / "m" / "results.md").read_text()
    assert "chosen on a selection half" in md and "paired bootstrap intervals" in md


def split_items_of(results, world, specs):
    """The split merge used, rebuilt from the prepared tasks."""
    from babymerge.evaluate import checkpoint_tokenizer, load_tasks

    tasks = load_tasks([f"{n}={s}" for n, s in specs.items()],
                       checkpoint_tokenizer(world.vlm, "--vlm"), world.features, 512,
                       checkpoint=world.vlm)
    return split_items(tasks, "half", results["selection"]["seed"])


def test_select_on_and_bootstrap_flags_are_checked():
    with pytest.raises(ValueError, match="--select-on 'third'"):
        MergeConfig(lm=Path("lm"), vlm=[Path("v")], task=["blimp:x"], select_on="third")
    with pytest.raises(ValueError, match="--bootstrap must be >= 0"):
        MergeConfig(lm=Path("lm"), vlm=[Path("v")], task=["blimp:x"], bootstrap=-1)
