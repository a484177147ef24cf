"""Resuming a merge sweep: its identity, its log of scored points, and its kept checkpoints.

A sweep's identity is what its scores and kept checkpoints are a function of: the checkpoints'
contents (not their paths: a moved run resumes), the prepared tasks (token ids and feature rows,
so task files, --features and the tokenizer are all covered), the method with the settings it
uses, and the dtype. Free to change on resume: the alpha grid and --keep (points are keyed by
(VLM name, alpha)), the --vlm list (each VLM has its own identity), --device and --batch-size
(as train's resume, they change only the rounding of the scoring: DARE's masks are drawn on the
CPU whatever the device), --allow-extrapolation.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import click

from babymerge.config import atomic_write_text, save_config
from babymerge.evaluate import PreparedTask
from babymerge.merge_inputs import MergeError, format_alpha, weight_files
from babymerge.merge_methods import MERGE_METHODS
from babymerge.model import BLACK_FEATURE_FILE

if TYPE_CHECKING:  # merge.py imports this module
    from babymerge.merge import MergeConfig


def kept_path(cfg: MergeConfig, vlm_name: str, alpha: float) -> Path:
    """Where a kept merge goes: ``OUT/alpha_<a>/``, or ``OUT/<vlm name>/alpha_<a>/`` in a
    checkpoint sweep."""
    sub = cfg.out if len(cfg.vlm) == 1 else cfg.out / vlm_name
    return sub / f"alpha_{format_alpha(alpha)}"


def log_record(path: Path, rec: dict) -> None:
    """Append ``rec`` as one line, as soon as it is scored. Ranks of a torchrun sweep append to
    the same file: each write is one ``os.write`` under an exclusive lock, after cutting off the
    unfinished last line of a writer killed mid-line (its point is scored again), which would
    otherwise end up in the middle of the log. A kill leaves at most the last line cut short,
    which :func:`read_metrics` drops."""
    line = (json.dumps(rec) + "\n").encode("utf-8")
    with path.open("a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            _cut_unfinished_line(f)
            os.write(f.fileno(), line)
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
    shown = " ".join(f"{n}={s:.4f}" for n, s in rec["scores"].items())
    what = (f"{rec['endpoint'].upper()} unmerged" if "endpoint" in rec else
            f"groups {', '.join(f'{g}={a}' for g, a in rec['group_alphas'].items())}"
            if "group_alphas" in rec else f"alpha={rec['alpha']}")
    click.echo(f"[{rec['vlm']}] {what}: {shown} objective={rec['objective']:.4f}")


def _cut_unfinished_line(f) -> None:
    """Truncate an open log after its last newline (nothing to do when it ends with one)."""
    end = f.seek(0, os.SEEK_END)
    position = end
    while position > 0:
        start = max(0, position - (1 << 16))
        f.seek(start)
        block = f.read(position - start)
        if position == end and block.endswith(b"\n"):
            return
        cut = block.rfind(b"\n")
        if cut >= 0:
            f.truncate(start + cut + 1)
            return
        position = start
    f.truncate(0)


_HASH_CHUNK = 1 << 20


def _file_digest(path: Path, cached: dict | None) -> dict:
    """sha256 of a file, reusing ``cached`` (this function's earlier answer, stored in
    merge_config.json) when path, size, inode, mtime and ctime are unchanged, so a resume reads no
    weights to recognise them; a rewritten file (a retrained checkpoint) is hashed again, and an
    identical rewrite (train re-publishing the same weights) still matches.

    mtime alone can be set back (``os.utime``, ``cp -p``, ``rsync -t``) over other contents of the
    same size; ctime cannot be set from user space and changes on every write, rename onto the
    file and utime, and a file replaced by a rename (as save_checkpoint publishes) has a new inode.
    """
    st = path.stat()
    entry = {"path": str(path.resolve()), "size": st.st_size, "inode": st.st_ino,
             "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}
    if cached and all(cached.get(k) == v for k, v in entry.items()) and "sha256" in cached:
        return cached
    h = hashlib.sha256()  # chunked: hashlib.file_digest needs Python 3.11, babymerge runs on 3.10
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    entry["sha256"] = h.hexdigest()
    return entry


def _checkpoint_fingerprint(directory: Path, cached: dict | None) -> dict:
    """{file name: digest} of the files the loaded model is made of (not the tokenizer: the
    prepared tasks' token ids cover it, and merge checks that the LM's vocabulary matches)."""
    files = [directory / "config.json", *weight_files(directory), directory / BLACK_FEATURE_FILE]
    cached = cached or {}
    return {f.name: _file_digest(f, cached.get(f.name)) for f in files if f.is_file()}


def _task_digest(task: PreparedTask) -> str:
    """sha256 of exactly what scoring reads from a prepared task."""
    h = hashlib.sha256(json.dumps([task.name, task.kind, task.input_ids, task.score_from,
                                   task.groups]).encode())
    for t in (task.feature_rows, task.item_start, task.features):
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def method_settings(cfg: MergeConfig) -> dict:
    """The flags the method reads (--density, --seed, --scale, where they apply): in results.json
    and in the sweep identity, so a rerun with another of them is refused."""
    method_cls = MERGE_METHODS[cfg.method]
    return {**({"density": cfg.density} if method_cls.uses_density else {}),
            **({"seed": cfg.seed} if method_cls.uses_seed else {}),
            **({"scale": cfg.scale} if method_cls.needs_base else {})}


def _saved_run(cfg: MergeConfig) -> tuple[dict, dict | None]:
    """merge_config.json of an earlier run into OUT ({} if none or unreadable) and its
    identity."""
    try:
        saved = json.loads((cfg.out / "merge_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        saved = {}
    saved = saved if isinstance(saved, dict) else {}
    return saved, saved.get("identity") if isinstance(saved.get("identity"), dict) else None


def fingerprint_checkpoints(cfg: MergeConfig, vlm_names: list[str]) -> dict:
    """The checkpoints' part of the identity (their files' digests), the earlier run's digests
    serving as a cache keyed by path and stat. Reads every weight file of a new checkpoint
    (0.5 s for two 413 MB files on 2 CPU cores): merge runs it in a thread beside the task
    loading (hashlib releases the GIL)."""
    old = _saved_run(cfg)[1] or {}
    return {
        "lm": _checkpoint_fingerprint(cfg.lm, old.get("lm")),
        "base": (_checkpoint_fingerprint(cfg.base, old.get("base"))
                 if MERGE_METHODS[cfg.method].needs_base else None),
        "vlms": {name: _checkpoint_fingerprint(d, old.get("vlms", {}).get(name))
                 for name, d in zip(vlm_names, cfg.vlm, strict=True)},
    }


def _identity(cfg: MergeConfig, tasks: list[PreparedTask], fingerprints: dict) -> dict:
    return {"method": {"name": cfg.method, **method_settings(cfg)}, "dtype": cfg.dtype,
            "lm": fingerprints["lm"], "base": fingerprints["base"],
            "tasks": [[t.name, _task_digest(t)] for t in tasks], "vlms": fingerprints["vlms"]}


def _contents(fingerprint: dict | None) -> dict | None:
    """A checkpoint fingerprint without paths and times: what identity comparisons look at."""
    return None if fingerprint is None else {n: d["sha256"] for n, d in fingerprint.items()}


# the identity's parts common to every --vlm, and the flags that set each
_SHARED_IDENTITY_FLAGS = (("method", "--method/--density/--scale/--seed"), ("dtype", "--dtype"),
                          ("lm", "--lm"), ("base", "--base"), ("tasks", "--task/--features"))


def kept_identity(identity: dict, vlm_name: str) -> str:
    """Digest of what a kept checkpoint of ``vlm_name`` is a function of (not the tasks), written
    into its merge.json: a complete ``alpha_<a>/`` (saved atomically) with the same digest is not
    saved again on resume."""
    essence = {"method": identity["method"], "dtype": identity["dtype"],
               "lm": _contents(identity["lm"]), "base": _contents(identity["base"]),
               "vlm": _contents(identity["vlms"][vlm_name])}
    return hashlib.sha256(json.dumps(essence, sort_keys=True).encode()).hexdigest()


def is_kept(cfg: MergeConfig, identity: dict, vlm_name: str, alpha: float) -> bool:
    path = kept_path(cfg, vlm_name, alpha) / "merge.json"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (saved.get("identity") == kept_identity(identity, vlm_name)
            and saved.get("alpha") == alpha)


def read_metrics(path: Path) -> list[dict]:
    """Every complete record of a merge's ``metrics.jsonl`` (a scored point, or an unmerged
    endpoint's score with ``"endpoint"``); a last line cut short by a kill is dropped (its point
    is scored again); any other bad line is an error. [] when there is no such file."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    out = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # no newline after it: the write was cut short
                break
            rec = None
        if not (isinstance(rec, dict) and isinstance(rec.get("vlm"), str)
                and isinstance(rec.get("scores"), dict)
                and (rec.get("endpoint") in ("vlm", "lm") or isinstance(rec.get("alpha"), float)
                     or isinstance(rec.get("group_alphas"), dict))):
            raise MergeError(f"{path}:{number}: not a merge record; fix or remove the line, or "
                             "pass --restart to discard every logged point")
        out.append(rec)
    return out


def _differences(old: dict, new: dict, have: set[str], cfg: MergeConfig,
                 vlm_names: list[str]) -> list[str]:
    """What differs between the logged sweep's identity and this run's, as flags."""
    diffs = []
    for key, flag in _SHARED_IDENTITY_FLAGS:
        before, now = old.get(key), new[key]
        if key in ("lm", "base"):
            before, now = _contents(before), _contents(now)
        if before == now:
            continue
        if key in ("lm", "base") and before and now:
            changed = sorted(n for n in set(before) | set(now) if before.get(n) != now.get(n))
            diffs.append(f"{flag} {getattr(cfg, key)}: {', '.join(changed)} changed")
        elif key == "tasks":
            names_before, names_now = [n for n, _ in before or []], [n for n, _ in now]
            changed = [n for n, d in now if [n, d] not in (before or [])]
            diffs.append(f"{flag}: tasks {names_before} -> {names_now}"
                         if names_before != names_now else
                         f"{flag}: the items or image features of {', '.join(changed)} changed")
        else:
            diffs.append(f"{flag}: {before!r} -> {now!r}")
    for name, directory in zip(vlm_names, cfg.vlm, strict=True):
        if name not in have:
            continue  # nothing of it to reuse: its identity is simply replaced
        before = _contents(old.get("vlms", {}).get(name))
        now = _contents(new["vlms"][name])
        if before != now:
            changed = sorted(n for n in set(before or {}) | set(now)
                             if (before or {}).get(n) != now.get(n))
            diffs.append(f"--vlm {directory}: {', '.join(changed)} changed since its points "
                         f"(as {name!r}) were logged")
    return diffs


def open_run(cfg: MergeConfig, tasks: list[PreparedTask], vlm_names: list[str],
             fingerprints: dict) -> tuple[dict, list[dict]]:
    """Check the out folder's logged points against this run's identity (its checkpoints'
    ``fingerprints``, :func:`fingerprint_checkpoints`; or discard them for --restart); rewrite
    metrics.jsonl without a cut-short last line and merge_config.json with the identity. Returns
    (identity, the logged records to reuse)."""
    config_path, metrics_path = cfg.out / "merge_config.json", cfg.out / "metrics.jsonl"
    saved, old = _saved_run(cfg)
    identity = _identity(cfg, tasks, fingerprints)
    if cfg.restart:
        logged = _restart(cfg, saved, old, identity, vlm_names)
    else:
        logged = read_metrics(metrics_path)
        if logged and old is None:
            raise MergeError(f"{metrics_path} holds {len(logged)} record(s) but {config_path} no "
                             "sweep identity to check them against (written by an older babymerge, "
                             "or removed); pass --restart to discard them, or use another --out")
        diffs = _differences(old, identity, {r["vlm"] for r in logged}, cfg, vlm_names) \
            if logged else []
        if diffs:
            raise MergeError(f"{cfg.out} holds points of a sweep with other inputs ("
                             + "; ".join(diffs) + "); rerun with the same ones, pass --restart to "
                             "discard those points, or use another --out")
    if logged:
        # VLMs of earlier runs keep their identity: their logged points stay reusable
        identity["vlms"] = {**old.get("vlms", {}), **identity["vlms"]}
    # metrics.jsonl first: a kill between the two writes must not leave old points under a new
    # identity (the reverse, old identity and no points, only starts afresh)
    atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in logged))
    # the log stays one that a --restart began while the runs resuming it have not finished it
    save_run_config(cfg, identity, restarted=cfg.restart
                     or (bool(logged) and saved.get(_RESTARTED_KEY) is True))
    return identity, logged


_RESTARTED_KEY = "restarted_unfinished"


def save_run_config(cfg: MergeConfig, identity: dict, restarted: bool) -> None:
    """merge_config.json: the command, the sweep identity, and whether the logged points are of a
    sweep a --restart run began that no run has finished yet (:func:`_restart`)."""
    save_config(cfg, cfg.out / "merge_config.json", identity=identity,
                **{_RESTARTED_KEY: restarted})


def _restart(cfg: MergeConfig, saved: dict, old: dict | None, identity: dict,
             vlm_names: list[str]) -> list[dict]:
    """The logged records a --restart run keeps: none, unless they are the points of a sweep that
    an earlier --restart run with the same inputs began and no run has finished since.

    --restart means "throw the old points away and sweep afresh", once. Long sweeps get killed,
    and the researcher's next move is the same command again: discarding the points the first
    --restart run made would throw away the very work it was asked to start (hours of it, as
    often as the sweep is interrupted). So the same --restart command resumes its own unfinished
    sweep, and discards the log whenever that could be what is meant: points logged under other
    inputs, points of a sweep that finished (a --restart then asks to score it all again), and
    points of a sweep begun without --restart (which may predate the fix the user restarts for).
    To throw away an unfinished restarted sweep too, remove OUT/metrics.jsonl."""
    metrics_path = cfg.out / "metrics.jsonl"
    try:
        logged = read_metrics(metrics_path)
    except MergeError:  # a damaged log is discarded as asked
        logged = None
    if (logged and old is not None and saved.get(_RESTARTED_KEY) is True
            and not _differences(old, identity, {r["vlm"] for r in logged}, cfg, vlm_names)):
        click.echo(f"--restart: resuming the unfinished sweep an earlier --restart of the same "
                   f"inputs began ({len(logged)} record(s) in {metrics_path}; remove that file to "
                   f"discard them)")
        return logged
    count = len(logged) if logged is not None else sum(
        1 for line in metrics_path.read_text(encoding="utf-8", errors="replace").splitlines()
        if line.strip())
    if count:
        click.echo(f"--restart: discarding {count} record(s) logged in {metrics_path}")
    return []


def reuse_line(points: dict, ends: dict, vlm_names: list[str], grid: list[float]) -> str | None:
    """One line naming the logged points this run reuses; None when there are none."""
    parts = []
    for name in vlm_names:
        alphas = [a for a in grid if (name, a) in points]
        endpoints = [w.upper() for w in ("vlm", "lm") if (name, w) in ends]
        if not alphas and not endpoints:
            continue
        shown = (f"all {len(grid)} alphas" if len(alphas) == len(grid) else
                 "alpha " + ", ".join(map(str, alphas)) if alphas else "no alpha")
        parts.append(f"{name}: {shown}" + (f" + unmerged {'/'.join(endpoints)}" if endpoints
                                           else ""))
    if not parts:
        return None
    count = sum((n, a) in points for n in vlm_names for a in grid)
    return (f"resuming: reused {count} of {len(grid) * len(vlm_names)} point(s) logged in "
            f"metrics.jsonl ({'; '.join(parts)})")
