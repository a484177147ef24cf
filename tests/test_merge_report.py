"""babymerge.merge_report: the rule's choice (its tie-break on objectives equal in exact arithmetic
but not in float), the plots legible with a real checkpoint sweep (BabyLM's 28 word-count
checkpoints) and a fine alpha grid, with a chance line on the objective panel, and the unmerged
endpoints' objective in results.md."""

from __future__ import annotations

import random

import babymerge.merge_report as M
from babymerge.merge_inputs import parse_alpha_grid
from babymerge.merge_report import DEFAULT_OBJECTIVE, choose, objective, parse_objective

TASKS = {"blimp": {"kind": "minimal_pairs", "metric": "accuracy", "chance": 0.5, "items": 1000},
         "winoground": {"kind": "winoground", "metric": "accuracy", "chance": 0.5, "items": 300},
         "vqa": {"kind": "vqa", "metric": "accuracy", "chance": 0.125, "items": 300}}
GROUPS = parse_objective(DEFAULT_OBJECTIVE)


def _record(alpha: float, vlm: str, scores: dict) -> dict:
    return {"alpha": alpha, "vlm": vlm, "scores": scores, **objective(scores, TASKS, GROUPS)}


def test_exact_tie_goes_to_the_smaller_alpha_despite_float_rounding():
    # 3/300 + 298/300 == 1/300 + 300/300 exactly, but the float objectives differ in the last bit
    # (0.7008333333333333 vs ...334): max() on floats gave the tie to the LARGER alpha
    low = _record(0.1, "vlm", {"blimp": 0.9, "winoground": 3 / 300, "vqa": 298 / 300})
    high = _record(0.2, "vlm", {"blimp": 0.9, "winoground": 1 / 300, "vqa": 300 / 300})
    assert low["objective"] != high["objective"]  # the float artefact this test is about
    assert choose([low, high], ["vlm"])["alpha"] == 0.1
    assert choose([high, low], ["vlm"])["alpha"] == 0.1
    # a real difference still wins over a smaller alpha
    better = _record(0.3, "vlm", {"blimp": 0.9, "winoground": 4 / 300, "vqa": 300 / 300})
    assert choose([low, high, better], ["vlm"])["alpha"] == 0.3
    # and a tie across VLMs at one alpha goes to the earlier VLM, whatever the float rounding
    a = _record(0.1, "late", {"blimp": 0.9, "winoground": 1 / 300, "vqa": 300 / 300})
    b = _record(0.1, "early", {"blimp": 0.9, "winoground": 3 / 300, "vqa": 298 / 300})
    assert choose([a, b], ["early", "late"])["vlm"] == "early"
    assert "1e-9" in M.RULE


def _sweep(n_vlms: int, alphas: list[float]) -> dict:
    rnd = random.Random(0)
    vlms = [f"words_{k}M" for k in range(1, n_vlms)] + ["vlm"]
    records, ends = [], {}
    for i, v in enumerate(vlms):
        for a in alphas:
            s = {t: min(1.0, info["chance"] + 0.3 * (i + 1) / n_vlms * (1 - abs(a - 0.3))
                        + rnd.random() * 0.02) for t, info in TASKS.items()}
            records.append(_record(a, v, s))
        ends[v] = {"vlm": records[-len(alphas)]["scores"], "lm": {t: 0.6 for t in TASKS}}
    best = choose(records, vlms)
    return {"tasks": TASKS, "records": records, "chosen_alpha": best["alpha"],
            "chosen_vlm": best["vlm"], "method": {"name": "linear", "reference": "-"},
            "objective_groups": GROUPS,
            "vlms": {v: v for v in vlms}, "endpoints": ends}


def _curve_lines(ax, labels):
    return [line for line in ax.get_lines() if line.get_label() in labels]


def test_alpha_curve_tells_28_checkpoints_apart():
    # BabyLM's schedule gives 28 word-count checkpoints: with colours cycling through C0..C9,
    # words_1M, words_20M and words_300M were drawn alike, and their legend inside the first
    # panel grew until constrained layout squashed every panel to a strip
    results = _sweep(28, parse_alpha_grid("0:1:0.1"))
    fig = M._alpha_figure(results)
    vlms = list(results["vlms"])
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        lines = _curve_lines(ax, set(vlms))
        assert len(lines) == 28 or not lines
        assert len({tuple(map(float, _rgba(line.get_color()))) for line in lines}) == len(lines)
        assert ax.get_legend() is None  # the legend is beside the panels, not over a curve
    assert fig.legends


def test_checkpoint_curve_labels_do_not_pile_up():
    results = _sweep(28, parse_alpha_grid("0:1:0.01"))
    fig = M._checkpoint_figure(results)
    fig.canvas.draw()
    for ax in fig.axes:
        if not ax.get_visible() or not ax.get_xticks().size:
            continue
        shown = [t for t in ax.get_xticklabels() if t.get_text()]
        assert len(shown) <= 12, len(shown)
        assert shown[-1].get_text() == "vlm"  # the final model is always named
    # 101 grid points: a colour bar for alpha, not a 104-entry legend taller than the figure
    entries = sum(len(leg.get_texts()) for leg in fig.legends)
    assert entries <= 12, entries


def _rgba(color):
    from matplotlib.colors import to_rgba
    return to_rgba(color)


def test_objective_panel_has_its_chance_line():
    # every task panel drew its chance line; the objective panel, the one the choice is read
    # from, had none: mean(0.5, mean(0.5, 0.125)) = 0.40625 for these tasks
    results = _sweep(2, [0.0, 0.5, 1.0])
    for figure in (M._alpha_figure, M._checkpoint_figure):
        fig = figure(results)
        ax = next(a for a in fig.axes if a.get_title().startswith("objective"))
        flat = [line.get_ydata()[0] for line in ax.get_lines()
                if line.get_linestyle() == "--" and len(set(line.get_ydata())) == 1
                and line.get_color() == "grey"]
        assert 0.40625 in flat, flat


def test_results_md_endpoints_carry_the_objective():
    # paper grid 0.3,0.5,0.8: the chosen alpha is the best grid point, and the unmerged VLM may
    # beat it on the rule's objective; results.md showed the endpoints' task scores only
    results = _sweep(1, [0.3, 0.5, 0.8])
    results.update(rule="-", lm="lm", kept=[])
    results["endpoints"]["vlm"]["vlm"] = {"blimp": 0.9, "winoground": 0.7, "vqa": 0.5}
    md = M.results_markdown(results)
    section = md.split("## Unmerged endpoints")[1]
    head = "| vlm | model | blimp | winoground | vqa | grammar | multimodal | objective |"
    assert head in section
    assert "| vlm | VLM | 0.9000 | 0.7000 | 0.5000 | 0.9000 | 0.6000 | 0.7500 |" in section
