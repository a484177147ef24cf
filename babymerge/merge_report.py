"""The outcome of a merge sweep: the rule that picks the chosen alpha, ``results.md``, and the plots
(``alpha_curve.png``; ``checkpoint_curve.png`` for a checkpoint sweep)."""

from __future__ import annotations

import io

from babymerge.tasks import TASK_KINDS

# The rule's groups: each group's score is the mean of its tasks' scores (task kinds or task
# names), the objective the mean of the groups that have tasks. The paper's: grammar is BLiMP
# (minimal pairs), multimodal the image tasks; EWoK, wug and the others are scored and plotted but
# stay out of the choice unless a group names them (--objective).
DEFAULT_OBJECTIVE = "grammar=minimal_pairs;multimodal=winoground,vqa"


def parse_objective(text: str, task_names: tuple[str, ...] = ()) -> dict[str, tuple[str, ...]]:
    """``NAME=MEMBER,MEMBER;NAME=...`` as {group: members}; a member is a task kind or, when
    ``task_names`` are given, a task name."""
    groups: dict[str, tuple[str, ...]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, eq, members = part.partition("=")
        names = tuple(m.strip() for m in members.split(",") if m.strip())
        if not eq or not name.strip() or not names:
            raise ValueError(f"--objective {text!r}: expected NAME=MEMBER,...;NAME=... "
                             "(members: task kinds or task names)")
        unknown = [m for m in names if m not in TASK_KINDS and m not in task_names]
        if task_names and unknown:
            raise ValueError(f"--objective: {', '.join(map(repr, unknown))} is neither a task kind "
                             f"({', '.join(TASK_KINDS)}) nor one of the tasks "
                             f"({', '.join(task_names)})")
        if name.strip() in groups or name.strip() == "objective":
            raise ValueError(f"--objective: group {name.strip()!r} named twice or reserved")
        groups[name.strip()] = names
    if not groups:
        raise ValueError("--objective: give at least one group")
    return groups


def rule_text(groups: dict[str, tuple[str, ...]]) -> str:
    """What results.json says of the choice."""
    parts = "; ".join(f"{g}: mean over {', '.join(m)}" for g, m in groups.items())
    return (f"chosen_alpha maximises the mean of the group scores ({parts}; a task kind or name "
            "per member), a group without tasks left out; over every grid point of every --vlm; "
            "ties (objectives within 1e-9) go to the smaller alpha, then to the VLM earlier in "
            "training")


RULE = rule_text(parse_objective(DEFAULT_OBJECTIVE))


def objective(scores: dict[str, float], tasks: dict[str, dict],
              groups: dict[str, tuple[str, ...]]) -> dict[str, float]:
    """Each group's mean and the rule's objective (their mean) for one record."""
    out = {}
    for key, members in groups.items():
        vals = [s for n, s in scores.items() if n in members or tasks[n]["kind"] in members]
        if vals:
            out[key] = sum(vals) / len(vals)
    out["objective"] = sum(out.values()) / len(out)
    return out


# Objectives this close are one value: accuracies are ratios of counts, and two sums equal in
# exact arithmetic (3/300 + 298/300 and 1/300 + 300/300) can differ in their float's last bit,
# which max() would then let decide the tie instead of the rule (seen in 23 of 29 sums tried).
# A real difference this small (sums of ratios with co-prime denominators can make one) is a
# millionth of one item of a 1,000-item task: far below any standard error, a tie in all but name.
TIE_TOLERANCE = 1e-9


def choose(records: list[dict], vlm_names: list[str]) -> dict:
    """The record :data:`RULE` picks."""
    top = max(r["objective"] for r in records)
    tied = [r for r in records if r["objective"] >= top - TIE_TOLERANCE]
    return min(tied, key=lambda r: (r["alpha"], vlm_names.index(r["vlm"])))


# --- results.md and the plots ----------------------------------------------------------------

def results_markdown(results: dict) -> str:
    """results.json as tables: tasks, every (VLM, alpha) record, the unmerged endpoints."""
    tasks = list(results["tasks"])
    m = results["method"]
    lines = ["# babymerge merge results", "",
             f"- method: `{m['name']}`: {m['reference']}",
             f"- LM: `{results['lm']}`; VLM(s): "
             + ", ".join(f"`{p}`" for p in results["vlms"].values()),
             f"- chosen: alpha = **{results['chosen_alpha']}** on `{results['chosen_vlm']}`",
             f"- rule: {results['rule']}", f"- {_selection_line(results)}", "", "## Tasks", "",
             "| task | kind | metric | items | chance |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {t['kind']} | {t['metric']} | {t['items']} | {t['chance']:.3f} |"
              for n, t in results["tasks"].items()]
    groups = results["objective_groups"]
    means = [k for k in groups if k in results["records"][0]]
    cols = tasks + means + ["objective"]
    lines += ["", "## Scores (accuracy as a fraction; Spearman's rho for wug tasks)", "",
              "| vlm | alpha | " + " | ".join(cols) + " |",
              "|---|---|" + "---|" * len(cols)]
    for r in results["records"]:
        chosen = r["alpha"] == results["chosen_alpha"] and r["vlm"] == results["chosen_vlm"]
        vals = [r["scores"][c] if c in r["scores"] else r[c] for c in cols]
        cells = [f"**{v:.4f}**" if chosen else f"{v:.4f}" for v in vals]
        lines.append(f"| {r['vlm']} | {r['alpha']}{' (chosen)' if chosen else ''} | "
                     + " | ".join(cells) + " |")
    # with the rule's means too: the chosen alpha is the best GRID point, and without them the
    # table did not show when the unmerged VLM (off a grid like 0.3,0.5,0.8) scores higher
    lines += ["", "## Unmerged endpoints", "", "| vlm | model | " + " | ".join(cols) + " |",
              "|---|---|" + "---|" * len(cols)]
    for vlm, ends in results["endpoints"].items():
        for which in ("vlm", "lm"):
            vals = {**ends[which], **objective(ends[which], results["tasks"], groups)}
            lines.append(f"| {vlm} | {which.upper()} | "
                         + " | ".join(f"{vals[c]:.4f}" for c in cols) + " |")
    lines += _interval_table(results, means)
    lines += _groups_section(results)
    if results["kept"]:
        lines += ["", "## Kept checkpoints", ""] + [f"- `{k}`" for k in results["kept"]]
    return "\n".join(lines) + "\n"


def _groups_section(results: dict) -> list[str]:
    """--groups: the groups, the points tried, the Pareto front and each group's reach."""
    g = results.get("groups")
    if not g:
        return []
    axes = g["axes"]
    lines = ["", f"## Per-group alphas (--groups {g['spec']})", "",
             "Coordinate ascent from the chosen uniform alpha: each round moves every group "
             "alone over the grid " + ", ".join(map(str, g["grid"])) + " and takes the best "
             "move; the first round's moves (probe) show what each group does alone.", "",
             "| group | tensors |", "|---|---|"]
    lines += [f"| {name} | {len(t)} |" for name, t in g["tensors"].items()]
    cols = axes + ["objective"]
    lines += ["", "| point | " + " | ".join(cols) + " | |", "|---|" + "---|" * (len(cols) + 1)]
    for p in g["points"]:
        key = ", ".join(f"{k}={v}" for k, v in p["group_alphas"].items())
        mark = ("best" if p.get("best") else f"probe {p['probe']}" if "probe" in p
                else "start" if p["round"] == 0 else f"round {p['round']}")
        lines.append(f"| {key} | " + " | ".join(f"{p[c]:.4f}" for c in cols) + f" | {mark} |")
    if g["pareto"]:
        lines += ["", f"Pareto front over the uniform and group points ({' vs '.join(axes)}; "
                  "no other point is as good on every axis and better on one):", ""]
        lines += [f"- {p['point']}: " + ", ".join(f"{a} {p[a]:.4f}" for a in axes)
                  for p in g["pareto"]]
    if g["sensitivity"]:
        lines += ["", f"How far each group alone moved {axes[0]} (max - min over its probes): "
                  + ", ".join(f"{k} {v:.4f}" for k, v in g["sensitivity"].items())]
    return lines


def _selection_line(results: dict) -> str:
    """Which items chose the alpha and which the tables show."""
    sel = results.get("selection")
    if not sel or sel["on"] == "all":
        return ("chosen on the items it is reported on (the paper's rule; --select-on half "
                "chooses on one half and reports the other)")
    counts = ", ".join(f"{n} {c['select']}/{c['report']}" for n, c in sel["items"].items())
    return (f"chosen on a selection half of each task's items (per UID, seed {sel['seed']}); "
            f"every score below is the other half's (items select/report: {counts})")


def _interval_table(results: dict, means: list[str]) -> list[str]:
    """Each point minus each unmerged endpoint, with its paired-bootstrap interval."""
    if not any("intervals" in r for r in results["records"]):
        return []
    sel = results["selection"]
    cols = ["objective"] + [m for m in means if m != "objective"]
    head = [f"{c} vs {w}" for c in cols for w in ("VLM", "LM")]
    lines = ["", f"## Against the unmerged endpoints ({100 * sel['confidence']:.0f}% paired "
             f"bootstrap intervals, {sel['bootstrap']} replicates over items, by UID)", "",
             "A difference whose interval excludes 0 is more than item noise; the intervals say "
             "nothing of training seeds.", "",
             "| vlm | alpha | " + " | ".join(head) + " |", "|---|---|" + "---|" * len(head)]

    def cell(d: dict) -> str:
        return f"{d['diff']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"

    for r in results["records"]:
        cells = [cell(r["intervals"][f"vs_{w}"][c]) for c in cols for w in ("vlm", "lm")]
        lines.append(f"| {r['vlm']} | {r['alpha']} | " + " | ".join(cells) + " |")
    return lines


def _panels(results: dict):
    """A figure with one panel per task plus the rule's objective, and each panel's value of a
    scores dict."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    panels = list(results["tasks"]) + ["objective"]
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.4 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).flatten()
    for ax in axes[len(panels):]:
        ax.set_visible(False)

    def value(scores: dict, panel: str) -> float:
        if panel == "objective":
            return objective(scores, results["tasks"], results["objective_groups"])["objective"]
        return scores[panel]

    return fig, list(zip(axes, panels)), value


def _title(ax, results: dict, panel: str) -> None:
    """Panel title, chance line and y label."""
    if panel != "objective":
        ax.axhline(results["tasks"][panel]["chance"], color="grey", ls="--", lw=0.8,
                   label="chance")
        ax.set_title(f"{panel} ({results['tasks'][panel]['kind']})")
    else:
        # the objective of a model at chance on every task: without it the panel alone does not
        # say whether a merge's objective is anything above guessing
        groups = results["objective_groups"]
        chance = objective({n: t["chance"] for n, t in results["tasks"].items()},
                           results["tasks"], groups)["objective"]
        ax.axhline(chance, color="grey", ls="--", lw=0.8)
        # the rule in brief, so the figure says why the circled point is the chosen one
        half = results.get("selection", {}).get("on") == "half"
        ax.set_title(f"objective = mean({', '.join(groups)})\n"
                     + ("report half; chosen: max on the selection half" if half else
                        "chosen: its max, ties to smaller alpha"), fontsize=9)
    metric = results["tasks"][panel]["metric"] if panel != "objective" else "score"
    ax.set_ylabel({"spearman": "Spearman's rho"}.get(metric, metric))
    ax.grid(alpha=0.3)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _vlm_colors(count: int) -> list:
    """One colour per --vlm, distinct however many: tab10 up to 10, else a sequential map in
    training order (BabyLM's schedule gives 28 checkpoints; cycling C0..C9 drew words_1M,
    words_20M and words_300M alike)."""
    if count <= 10:
        return [f"C{i}" for i in range(count)]
    from matplotlib import colormaps

    shades = colormaps["plasma"]  # dark early to light late; stops before the palest yellow
    return [shades(0.9 * i / (count - 1)) for i in range(count)]


def _outside_legend(fig, ax) -> None:
    """The legend beside the panels (one entry per curve: over the curves it hid them, and
    constrained layout shrank every panel to fit a tall one)."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=7,
               ncols=1 if len(labels) <= 30 else 2)


def _alpha_figure(results: dict):
    """:func:`plot_alpha_curve`'s figure."""
    fig, panels, value = _panels(results)
    vlms = list(results["vlms"])
    colors = _vlm_colors(len(vlms))
    for ax, panel in panels:
        for vlm, color in zip(vlms, colors):
            recs = [r for r in results["records"] if r["vlm"] == vlm]
            ax.plot([r["alpha"] for r in recs], [value(r["scores"], panel) for r in recs], "o-",
                    color=color, ms=3, label=vlm if len(vlms) > 1 else "merged")
            ends = results["endpoints"][vlm]
            ax.plot([0.0], [value(ends["vlm"], panel)], "*", color=color, ms=13, mfc="none",
                    label="VLM (unmerged)" if vlm == vlms[0] else None)
            ax.plot([1.0], [value(ends["lm"], panel)], "s", color=color, ms=9, mfc="none",
                    label="LM (unmerged)" if vlm == vlms[0] else None)
        best = next(r for r in results["records"] if r["alpha"] == results["chosen_alpha"]
                    and r["vlm"] == results["chosen_vlm"])
        ax.axvline(best["alpha"], color="crimson", ls=":", lw=1.2)
        ax.plot([best["alpha"]], [value(best["scores"], panel)], "o", color="crimson", ms=9,
                mfc="none", mew=2, label=f"chosen alpha={best['alpha']}")
        _title(ax, results, panel)
        ax.set_xlabel("alpha (0 = VLM, 1 = LM)")
    if len(vlms) > 1:
        _outside_legend(fig, panels[0][0])
    else:
        panels[0][0].legend(fontsize=7)
    fig.suptitle(f"{results['method']['name']} merge: score against alpha")
    return fig


def plot_pareto(results: dict) -> bytes:
    """PNG for --groups: the first two objective groups against each other (multimodal across,
    grammar up, by default): the uniform alphas as a curve, every group point tried, the Pareto
    front, the best group point circled."""
    from matplotlib.figure import Figure

    g = results["groups"]
    y, x = g["axes"][0], g["axes"][1] if len(g["axes"]) > 1 else "objective"
    fig = Figure(figsize=(6.4, 5.0), layout="constrained")
    ax = fig.subplots()
    uniform = results["records"]
    ax.plot([r[x] for r in uniform], [r[y] for r in uniform], "o-", color="C0", ms=4,
            label="one alpha (uniform)")
    for r in uniform:
        ax.annotate(f"{r['alpha']:g}", (r[x], r[y]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    points = g["points"]
    ax.plot([p[x] for p in points], [p[y] for p in points], "x", color="C1", ms=5,
            label=f"per-group alphas ({g['spec']})")
    front = sorted(g["pareto"], key=lambda p: p[x])
    ax.plot([p[x] for p in front], [p[y] for p in front], "--", color="C2", lw=1.2,
            label="Pareto front")
    best = next(p for p in points if p.get("best"))
    ax.plot([best[x]], [best[y]], "o", color="crimson", ms=10, mfc="none", mew=2,
            label="best group point")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle("per-group merging against one alpha")
    return _png(fig)


def plot_alpha_curve(results: dict) -> bytes:
    """PNG: one panel per task plus the rule's objective; score against alpha for every VLM, the
    unmerged LM (alpha = 1) and VLM (alpha = 0) marked, the chosen alpha highlighted."""
    return _png(_alpha_figure(results))


MAX_LEGEND_ALPHAS = 12  # more grid points get a colour bar: a legend taller than the figure
MAX_TICK_LABELS = 12  # checkpoint names shown on the x axis; more pile up into a black smear


def _checkpoint_figure(results: dict):
    """:func:`plot_checkpoint_curve`'s figure."""
    fig, panels, value = _panels(results)
    vlms = list(results["vlms"])
    alphas = sorted({r["alpha"] for r in results["records"]})
    from matplotlib import colormaps  # imported here: matplotlib loads only when plotting
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    shades = colormaps["viridis"]  # alpha 0 dark to alpha 1 light, however many grid points
    norm = Normalize(min(alphas), max(alphas) if len(alphas) > 1 else min(alphas) + 1)
    many = len(alphas) > MAX_LEGEND_ALPHAS
    x = list(range(len(vlms)))
    # every MAX_TICK_LABELS-th name, counted back from the last (the final model) so it is shown
    every = -(-len(vlms) // MAX_TICK_LABELS)
    tick_labels = [v if (len(vlms) - 1 - i) % every == 0 else "" for i, v in enumerate(vlms)]
    for ax, panel in panels:
        for alpha in alphas:
            by_vlm = {r["vlm"]: r for r in results["records"] if r["alpha"] == alpha}
            ax.plot(x, [value(by_vlm[v]["scores"], panel) for v in vlms], "o-", ms=3, lw=1,
                    color=shades(norm(alpha)), label=None if many else f"alpha={alpha}")
        for which, style in (("vlm", "*--"), ("lm", "s--")):
            ax.plot(x, [value(results["endpoints"][v][which], panel) for v in vlms], style,
                    color="black" if which == "vlm" else "grey", ms=7, mfc="none",
                    label=f"{which.upper()} (unmerged)")
        best = next(r for r in results["records"] if r["alpha"] == results["chosen_alpha"]
                    and r["vlm"] == results["chosen_vlm"])
        ax.plot([vlms.index(best["vlm"])], [value(best["scores"], panel)], "o", color="crimson",
                ms=10, mfc="none", mew=2, label="chosen")
        _title(ax, results, panel)
        ax.set_xticks(x, tick_labels, rotation=30, ha="right", fontsize=7)
        ax.set_xlabel("VLM checkpoint (training order)")
    # one line per grid point: the legend goes beside the panels, not over the curves
    _outside_legend(fig, panels[0][0])
    if many:
        fig.colorbar(ScalarMappable(norm=norm, cmap=shades), ax=[ax for ax, _ in panels],
                     label="alpha (0 = VLM, 1 = LM)", shrink=0.6)
    fig.suptitle(f"{results['method']['name']} merge: score over the VLM checkpoints")
    return fig


def plot_checkpoint_curve(results: dict) -> bytes:
    """PNG for a checkpoint sweep, the paper's curves over training: score against the --vlm
    checkpoints (in training order, :func:`babymerge.merge_inputs.order_by_training`), one line
    per alpha beside the unmerged VLM and LM, the chosen (checkpoint, alpha) circled."""
    return _png(_checkpoint_figure(results))
