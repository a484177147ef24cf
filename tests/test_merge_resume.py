"""babymerge merge resumes: an interrupted sweep rerun with the same command scores only the missing
points and ends with the results of an uninterrupted run; another identity is refused (or
discarded with --restart); a longer grid reuses the logged points; a finished VLM is not loaded."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

import babymerge.merge as merge_module
import babymerge.merge_resume as merge_resume
from babymerge.merge import MergeConfig, MergeError, merge
from fixtures import eval_world, make_checkpoint  # noqa: F401  (eval_world: fixture)

TIMINGS = ("merge_s", "eval_s")


class Interrupted(Exception):
    """Stands for Ctrl-C or a kill between two scored points."""


@pytest.fixture
def spy(monkeypatch):
    """Counts scorings, model loads and endpoint reads in merge; ``spy.fail_at = n`` raises on the
    n-th scoring (1-based), as an interruption after n - 1 logged points."""
    class Spy:
        scored = loads = reads = saves = 0
        fail_at = None

    real_eval, real_load = merge_module.evaluate_tasks, merge_module.load_model
    real_read, real_save = merge_module.read_tensors, merge_module.save_checkpoint

    def evaluate_tasks(*args, **kw):
        Spy.scored += 1
        if Spy.scored == Spy.fail_at:
            raise Interrupted
        return real_eval(*args, **kw)

    def count(name, real):
        def wrapped(*args, **kw):
            setattr(Spy, name, getattr(Spy, name) + 1)
            return real(*args, **kw)
        return wrapped

    monkeypatch.setattr(merge_module, "evaluate_tasks", evaluate_tasks)
    monkeypatch.setattr(merge_module, "load_model", count("loads", real_load))
    monkeypatch.setattr(merge_module, "read_tensors", count("reads", real_read))
    monkeypatch.setattr(merge_module, "save_checkpoint", count("saves", real_save))
    # the figures are test_merge_report.py's; rendering them is most of a tiny merge's time
    for plot in ("plot_alpha_curve", "plot_checkpoint_curve"):
        monkeypatch.setattr(merge_module, plot, lambda results: b"png")

    def reset():
        Spy.scored = Spy.loads = Spy.reads = Spy.saves = 0
        Spy.fail_at = None

    Spy.reset = staticmethod(reset)
    return Spy


def config(world, out, **kw):
    kw.setdefault("task", list(world.specs.values()))
    return MergeConfig(lm=world.lm, vlm=kw.pop("vlm", [world.vlm]), features=world.features,
                       out=out, **kw)


def comparable(results: dict, out: Path) -> dict:
    """results.json without timings and with kept paths relative to the out folder."""
    return {**results, "records": [{k: v for k, v in r.items() if k not in TIMINGS}
                                   for r in results["records"]],
            "kept": [str(Path(k).relative_to(out)) for k in results["kept"]]}


def on_disk(out: Path) -> dict:
    return comparable(json.loads((out / "results.json").read_text()), out)


def test_interrupted_sweep_resumes_to_the_uninterrupted_results(eval_world, tmp_path, spy, capsys):
    # no 1.0 in the grid: the LM's unmerged score is its own logged record
    kw = dict(alpha_grid="0,0.25,0.5,0.75", keep="0.25,chosen")
    reference = merge(config(eval_world, tmp_path / "ref", **kw))
    assert spy.scored == 5 and spy.loads == 1

    out = tmp_path / "run"
    spy.reset()
    spy.fail_at = 4  # 0, 0.25, 0.5 logged (0.25 kept), killed while scoring 0.75
    with pytest.raises(Interrupted):
        merge(config(eval_world, out, **kw))
    kept = out / "alpha_0.25"
    assert (kept / "merge.json").is_file() and spy.saves == 1
    kept_mtime = (kept / "model.safetensors").stat().st_mtime_ns
    # and a kill in the middle of writing the next line
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"alpha": 0.75, "vlm": "vlm", "scores": {"bli')
    capsys.readouterr()

    spy.reset()
    results = merge(config(eval_world, out, **kw))
    assert spy.scored == 2  # 0.75 and the unmerged LM: nothing logged is scored again
    assert "resuming: reused 3 of 4 point(s)" in capsys.readouterr().out
    assert comparable(results, out) == comparable(reference, tmp_path / "ref") == on_disk(out)
    assert (kept / "model.safetensors").stat().st_mtime_ns == kept_mtime  # complete: not re-saved
    chosen = results["chosen_alpha"]
    assert spy.saves == (0 if chosen == 0.25 else 1)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 5 and all(json.loads(line) for line in lines)  # the cut line is gone

    spy.reset()  # a finished sweep rerun: rebuilt from the log, nothing loaded, read or scored
    again = merge(config(eval_world, out, **kw))
    assert (spy.scored, spy.loads, spy.reads, spy.saves) == (0, 0, 0, 0)
    assert comparable(again, out) == comparable(reference, tmp_path / "ref")

    spy.reset()  # the chosen checkpoint deleted by hand: that VLM is loaded again, only to save
    shutil.rmtree(out / f"alpha_{chosen}")
    (out / f".alpha_{chosen}.killed").mkdir()  # what a kill during its save leaves
    merge(config(eval_world, out, **kw))
    assert (spy.scored, spy.loads, spy.saves) == (0, 1, 1)
    assert (out / f"alpha_{chosen}" / "model.safetensors").is_file()
    assert not (out / f".alpha_{chosen}.killed").exists()


def test_another_identity_is_refused_or_restarted(eval_world, tmp_path, spy):
    vlm = shutil.copytree(eval_world.vlm, tmp_path / "vlm")
    out = tmp_path / "out"
    kw = dict(alpha_grid="0,1", keep="none", task=[eval_world.specs["blimp"]])
    merge(config(eval_world, out, vlm=[vlm], **kw))

    refused = [(dict(dtype="bfloat16"), r"--dtype: 'float32' -> 'bfloat16'"),
               (dict(method="slerp"), r"--method.*'linear'.*'slerp'"),
               (dict(task=[eval_world.specs["blimp"], eval_world.specs["wg"]]),
                r"--task/--features: tasks \['blimp'\] -> \['blimp', 'wg'\]")]
    for change, message in refused:
        with pytest.raises(MergeError, match=message + r".*pass --restart"):
            merge(config(eval_world, out, vlm=[vlm], **{**kw, **change}))

    # a task file edited in place: same name, other items
    tasks = shutil.copytree(eval_world.root / "tasks" / "blimp", tmp_path / "blimp")
    spec = f"blimp=minimal_pairs:{tasks}"
    merge(config(eval_world, tmp_path / "out2", vlm=[vlm], **{**kw, "task": [spec]}))
    first = tasks / "order.jsonl"
    first.write_text("".join(first.read_text().splitlines(keepends=True)[1:]))
    with pytest.raises(MergeError, match="the items or image features of blimp changed"):
        merge(config(eval_world, tmp_path / "out2", vlm=[vlm], **{**kw, "task": [spec]}))

    # the same weights written again (train re-publishing them): hashed again, still the same
    weights = vlm / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    spy.reset()
    merge(config(eval_world, out, vlm=[vlm], **kw))
    assert spy.scored == spy.loads == 0

    # a retrained checkpoint behind the same folder: refused, then discarded with --restart
    make_checkpoint(vlm, eval_world.tokenizer, seed=7)
    with pytest.raises(MergeError, match=r"--vlm .*vlm: model.safetensors changed"):
        merge(config(eval_world, out, vlm=[vlm], **kw))
    spy.reset()
    results = merge(config(eval_world, out, vlm=[vlm], restart=True, **kw))
    assert spy.scored == 2
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["scores"] for r in logged] == [r["scores"] for r in results["records"]]
    spy.reset()
    merge(config(eval_world, out, vlm=[vlm], **kw))  # and that new sweep resumes as usual
    assert spy.scored == 0

    # points logged by a babymerge before resuming (no identity to check them against)
    saved = json.loads((out / "merge_config.json").read_text())
    del saved["identity"]
    (out / "merge_config.json").write_text(json.dumps(saved))
    with pytest.raises(MergeError, match="no sweep identity.*pass --restart"):
        merge(config(eval_world, out, vlm=[vlm], **kw))


def test_a_longer_grid_reuses_the_logged_points(eval_world, tmp_path, spy):
    kw = dict(keep="none", task=[eval_world.specs["blimp"]])
    out = tmp_path / "out"
    merge(config(eval_world, out, alpha_grid="0,0.5", **kw))
    assert spy.scored == 3  # 0, 0.5 and the unmerged LM (1 is not on this grid)
    spy.reset()
    extended = merge(config(eval_world, out, alpha_grid="0:1:0.25", **kw))
    assert spy.scored == 3  # 0.25, 0.75, 1; with 1 on the grid the LM endpoint is that point
    fresh = merge(config(eval_world, tmp_path / "fresh", alpha_grid="0:1:0.25", **kw))
    assert comparable(extended, out) == comparable(fresh, tmp_path / "fresh")
    assert extended["method"] == {"name": "linear", "reference": extended["method"]["reference"]}
    spy.reset()  # a shorter grid again: a subset of the log, nothing scored
    short = merge(config(eval_world, out, alpha_grid="0,1", **kw))
    assert spy.scored == 0 and [r["alpha"] for r in short["records"]] == [0.0, 1.0]


def test_points_logged_without_item_outcomes_are_scored_again(eval_world, tmp_path, spy):
    """Intervals and --select-on need each point's per-item outcomes; a point logged without
    them (by an older babymerge) is scored again, and --select-on may change on a resume
    without scoring anything (the outcomes serve any split)."""
    kw = dict(keep="none", alpha_grid="0,0.5,1")
    out = tmp_path / "out"
    reference = merge(config(eval_world, out, **kw))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("items" in r for r in lines)
    (out / "metrics.jsonl").write_text("".join(
        json.dumps({k: v for k, v in r.items() if k != "items" or r["alpha"] != 0.5}) + "\n"
        for r in lines))
    spy.reset()
    again = merge(config(eval_world, out, **kw))
    assert spy.scored == 1  # alpha 0.5 only
    assert comparable(again, out) == comparable(reference, out)
    spy.reset()
    half = merge(config(eval_world, out, select_on="half", **kw))
    assert spy.scored == 0 and half["selection"]["on"] == "half"


def test_checkpoint_sweep_skips_finished_vlms(eval_world, tmp_path, spy):
    """A checkpoint sweep killed in its second VLM loads only that one again; its kept winner is
    the uninterrupted run's."""
    vlm2 = make_checkpoint(tmp_path / "vlm2", eval_world.tokenizer, seed=5)
    kw = dict(vlm=[eval_world.vlm, vlm2], alpha_grid="1", keep="chosen", method="dare",
              base=eval_world.base, density=0.5, task=[eval_world.specs["blimp"]])
    reference = merge(config(eval_world, tmp_path / "ref", **kw))
    out = tmp_path / "out"
    spy.reset()
    # dare scores both unmerged endpoints: vlm's VLM, 1, LM; vlm2's VLM; killed at its 1
    spy.fail_at = 5
    with pytest.raises(Interrupted):
        merge(config(eval_world, out, **kw))
    spy.reset()
    results = merge(config(eval_world, out, **kw))
    # vlm2 to finish its grid, then the winner once more to save it; vlm is not loaded to score
    assert spy.scored == 2 and spy.loads == 2
    assert comparable(results, out) == comparable(reference, tmp_path / "ref")
    assert Path(results["kept"][0]).parent.name == results["chosen_vlm"]
    # DARE's masks follow --seed: it is reported, and part of the sweep's identity
    assert results["method"]["seed"] == 0
    with pytest.raises(MergeError, match=r"--method/--density/--scale/--seed: .*'seed': 0.*"
                                         r"'seed': 1"):
        merge(config(eval_world, out, **{**kw, "seed": 1}))


def test_restart_discards_once_and_the_same_command_rerun_resumes(eval_world, tmp_path, spy,
                                                                   capsys):
    """--restart throws the log away once: run again after an interruption, the same --restart
    command resumes the sweep it began; a finished sweep, or other inputs, are discarded again."""
    kw = dict(alpha_grid="0,0.5,1", keep="none", task=[eval_world.specs["blimp"]])
    reference = merge(config(eval_world, tmp_path / "ref", **kw))
    out = tmp_path / "out"
    spy.reset()
    spy.fail_at = 2  # a sweep begun without --restart, one point logged
    with pytest.raises(Interrupted):
        merge(config(eval_world, out, **kw))
    capsys.readouterr()
    spy.reset()
    spy.fail_at = 3  # --restart discards that point, logs 0 and 0.5, is killed scoring 1
    with pytest.raises(Interrupted):
        merge(config(eval_world, out, restart=True, **kw))
    assert "--restart: discarding 1 record(s)" in capsys.readouterr().out
    spy.reset()
    results = merge(config(eval_world, out, restart=True, **kw))  # the same command again
    assert spy.scored == 1
    assert "--restart: resuming the unfinished sweep" in capsys.readouterr().out
    assert comparable(results, out) == comparable(reference, tmp_path / "ref")

    spy.reset()  # finished: a --restart scores everything again
    merge(config(eval_world, out, restart=True, **kw))
    assert spy.scored == 3 and "discarding 3 record(s)" in capsys.readouterr().out
    spy.reset()
    spy.fail_at = 2  # a restarted sweep killed after one point, rerun with another --dtype
    with pytest.raises(Interrupted):
        merge(config(eval_world, out, restart=True, **kw))
    capsys.readouterr()
    spy.reset()
    merge(config(eval_world, out, restart=True, dtype="bfloat16", **kw))
    assert spy.scored == 3 and "discarding 1 record(s)" in capsys.readouterr().out


def test_a_swapped_checkpoint_with_its_old_size_and_mtime_is_hashed_again(eval_world, tmp_path,
                                                                          spy):
    """The hash cache's key holds the inode and ctime: another checkpoint of the same size put in
    place and given the old mtime (os.utime, cp -p, rsync -t) is not taken for the logged one."""
    vlm = shutil.copytree(eval_world.vlm, tmp_path / "vlm")
    other = make_checkpoint(tmp_path / "other", eval_world.tokenizer, seed=7) / "model.safetensors"
    out = tmp_path / "out"
    kw = dict(vlm=[vlm], alpha_grid="0,1", keep="none", task=[eval_world.specs["blimp"]])
    merge(config(eval_world, out, **kw))
    weights = vlm / "model.safetensors"
    original, st = weights.read_bytes(), weights.stat()
    assert other.stat().st_size == st.st_size and other.read_bytes() != original
    swaps = {"written in place": lambda: shutil.copyfile(other, weights),
             "renamed onto it": lambda: os.replace(shutil.copy(other, vlm / "new"), weights)}
    for how, swap in swaps.items():
        swap()
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert (weights.stat().st_size, weights.stat().st_mtime_ns) == (st.st_size,
                                                                          st.st_mtime_ns)
        with pytest.raises(MergeError, match=r"--vlm .*vlm: model.safetensors changed"):
            merge(config(eval_world, out, **kw))
        weights.write_bytes(original)
    spy.reset()  # the logged weights back: hashed again, recognised, nothing scored
    merge(config(eval_world, out, **kw))
    assert spy.scored == 0


def test_file_hash_needs_no_python_3_11(tmp_path, monkeypatch):
    """pyproject allows Python 3.10, which has no hashlib.file_digest."""
    monkeypatch.delattr(hashlib, "file_digest", raising=False)
    data = os.urandom(3 * merge_resume._HASH_CHUNK // 2)  # more than one chunk, not a multiple
    (tmp_path / "w").write_bytes(data)
    assert merge_resume._file_digest(tmp_path / "w", None)["sha256"] == \
        hashlib.sha256(data).hexdigest()


def test_a_damaged_log_line_is_named_and_kept_until_restart(eval_world, tmp_path, spy, capsys):
    """A bad line other than a last one cut short is not a kill's trace: the rerun names the file
    and line and leaves the log as it was; --restart discards it."""
    out = tmp_path / "out"
    kw = dict(alpha_grid="0,1", keep="none", task=[eval_world.specs["blimp"]])
    merge(config(eval_world, out, **kw))
    metrics = out / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    damaged = lines[0] + '{"alpha": "half"}\n' + "".join(lines[1:])
    metrics.write_text(damaged)
    with pytest.raises(MergeError, match=r"metrics.jsonl:2: not a merge record.*--restart"):
        merge(config(eval_world, out, **kw))
    assert metrics.read_text() == damaged
    capsys.readouterr()
    spy.reset()
    merge(config(eval_world, out, restart=True, **kw))
    assert spy.scored == 2 and "discarding 3 record(s)" in capsys.readouterr().out
    assert len(metrics.read_text().splitlines()) == 2


def test_an_append_after_a_writer_killed_mid_line_cuts_that_line_first(tmp_path):
    """torchrun ranks append to one log: a rank killed mid-line must not leave its half line in
    the middle of the log, where read_metrics would refuse it, once another rank appends."""
    from babymerge.merge_resume import log_record, read_metrics

    rec = {"alpha": 0.5, "vlm": "v", "scores": {"t": 0.5}, "objective": 0.5}
    path = tmp_path / "metrics.jsonl"
    log_record(path, rec)
    with path.open("a") as f:
        f.write('{"alpha": 0.7, "vlm": "v", "scores": {"t"' + "x" * 70_000)  # > one read block
    log_record(path, {**rec, "alpha": 1.0})
    assert [r["alpha"] for r in read_metrics(path)] == [0.5, 1.0]
    path.write_text('{"cut": ')  # a first line cut short: nothing before it to keep
    log_record(path, rec)
    assert [r["alpha"] for r in read_metrics(path)] == [0.5]


def test_save_checkpoint_itself_removes_killed_saves(tmp_path):
    """merge's own cleanup of a killed save's temporary folder moved into save_checkpoint, so
    every caller gets it (train's resume/ and word-count checkpoints too); the folder name is
    matched literally (a name with glob characters), and another checkpoint's folders stay."""
    import torch

    from babymerge.model import save_checkpoint

    model = torch.nn.Linear(2, 2)

    def save_pretrained(path, safe_serialization):
        for name in ("w", "config.json", "model.safetensors"):  # what save_checkpoint checks
            (Path(path) / name).write_text("w")

    model.save_pretrained = save_pretrained
    for name, stale, other in (("resume", ".resume.k1ll3d", ".resume_old.keep"),
                               ("a[1]", ".a[1].k1ll3d", ".a1.keep")):
        (tmp_path / stale).mkdir()
        (tmp_path / other).mkdir()
        save_checkpoint(model, tmp_path / name)
        assert not (tmp_path / stale).exists() and (tmp_path / other).is_dir()
        assert (tmp_path / name / "w").read_text() == "w"
