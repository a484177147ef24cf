"""``babymerge export``: the exported plain Llama scores ``[BOS, <image>] + text`` exactly as the
BabyLLaVA checkpoint scores text-only input (the black feature in the image slot)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from babymerge.evaluate import EvalConfig, evaluate, load_tasks, score_candidates
from babymerge.export import EXPORT_NOTE_FILE, ExportConfig, ExportError, export
from babymerge.featurefile import FeatureTable
from babymerge.features import ExtractConfig, extract_features, save_random_dinov2
from babymerge.model import (MODEL_PRESETS, build_model, image_prefix_ids, load_black_feature,
                             load_model, save_black_feature, save_checkpoint,
                             set_feature_statistics)
from babymerge.tokenizer import load_tokenizer
from fixtures import (TEXT_ANIMALS, TEXT_COLORS, vlm_of_random_encoder, world,  # noqa: F401
                      write_jsonl)


@pytest.mark.parametrize("feature_norm", ["none", "standardize"])
def test_export_scores_like_the_text_only_model(world, tmp_path, feature_norm):
    tok = load_tokenizer(world["tokenizer"])
    ids = dict(vocab_size=len(tok), image_token_id=image_prefix_ids(tok)[1],
               pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id)
    model = build_model(MODEL_PRESETS["tiny"], seed=0, feature_norm=feature_norm, **ids).eval()
    g = torch.Generator().manual_seed(0)
    if feature_norm == "standardize":
        set_feature_statistics(model, torch.randn(1024, generator=g), torch.rand(1024) + 0.5)
    black = torch.randn(1024, generator=g)
    save_checkpoint(model, tmp_path / "ck", tok)
    save_black_feature(tmp_path / "ck", black)

    out = export(ExportConfig(checkpoint=tmp_path / "ck", out=tmp_path / "llama"))
    llama = LlamaForCausalLM.from_pretrained(out).eval()
    exported_tok = AutoTokenizer.from_pretrained(out)
    text = exported_tok("the red cat sees a dog", add_special_tokens=False)["input_ids"]
    # the default special tokens are the training layout's [BOS, <image>]
    assert exported_tok("the red cat sees a dog")["input_ids"] == image_prefix_ids(tok) + text
    seq = torch.tensor([image_prefix_ids(tok) + text])
    want = model(input_ids=seq, pixel_values=black[None]).logits
    assert torch.allclose(llama(input_ids=seq).logits, want, atol=1e-5)
    note = json.loads((out / EXPORT_NOTE_FILE).read_text())
    assert note["prefix_ids"] == image_prefix_ids(tok)


def test_export_refuses_a_checkpoint_without_its_black_feature(tmp_path):
    model = build_model(MODEL_PRESETS["tiny"], seed=0, vocab_size=50, image_token_id=4,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    save_checkpoint(model, tmp_path / "ck")
    with pytest.raises(ExportError, match="black_feature.safetensors"):
        export(ExportConfig(checkpoint=tmp_path / "ck", out=tmp_path / "out"))
    with pytest.raises(ExportError, match="not a checkpoint directory"):
        export(ExportConfig(checkpoint=tmp_path, out=tmp_path / "out"))


def test_export_refuses_a_tied_head_naming_the_checkpoint(world, tmp_path):
    """A checkpoint whose LM head is tied to the embeddings (not babymerge's own; another tool's)
    cannot take the black feature in its <image> row: an export error naming the checkpoint,
    which the CLI prints without a traceback, and nothing written."""
    tok = load_tokenizer(world["tokenizer"])
    model = build_model(MODEL_PRESETS["tiny"], seed=0, vocab_size=len(tok),
                        image_token_id=image_prefix_ids(tok)[1], pad_token_id=tok.pad_token_id,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model.config.text_config.tie_word_embeddings = True
    save_checkpoint(model, tmp_path / "ck", tok)
    save_black_feature(tmp_path / "ck", torch.zeros(1024))
    with pytest.raises(ExportError, match=r"ck: export: this checkpoint ties its LM head"):
        export(ExportConfig(checkpoint=tmp_path / "ck", out=tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# The BabyLM pipeline's causal scoring (evaluation_pipeline/sentence_zero_shot, read from its
# source at bf55c11), written out for a fresh interpreter without babymerge: each sentence is
# tokenised with the tokenizer's default special tokens and offsets; the scored tokens are those
# whose character span ends past the completion's start; the score is the sum of their
# log-softmax; the first maximum wins (a tie counts for the gold sentence); accuracy is per UID
# (the file stem for lines without one), in percent, averaged over UIDs.
PIPELINE_RULES = r"""
import json, sys, pathlib
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, data = sys.argv[1], pathlib.Path(sys.argv[2])
tok = AutoTokenizer.from_pretrained(folder, padding_side="right")
model = AutoModelForCausalLM.from_pretrained(folder).eval()

def score(sentence, completion):
    enc = tok(sentence, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    start = len(sentence) - len(completion) + offsets[0][0]
    mask = torch.tensor([end > start for _, end in offsets])
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
    picked = logp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    return float((picked * mask[1:]).sum())

per_uid, scores = {}, []
for path in sorted(data.glob("*.jsonl")):
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        good = score(rec["sentence_good"], rec["sentence_good"])
        bad = score(rec["sentence_bad"], rec["sentence_bad"])
        scores.append([good, bad])
        uid = rec["UID"] if "field" in rec else path.stem
        per_uid.setdefault(uid, []).append(int(torch.tensor([good, bad]).max(0)[1]) == 0)
acc = {u: 100.0 * sum(v) / len(v) for u, v in per_uid.items()}
print(json.dumps({"scores": scores, "uids": acc, "average": sum(acc.values()) / len(acc)}))
"""


def test_export_scores_minimal_pairs_as_the_pipeline_rules_do(world, tmp_path):
    """The export, read by the pipeline's rules in an interpreter without babymerge, gives every
    sentence babymerge eval's score (a test would fail with the tokenizer's old [BOS] + text)."""
    tok = load_tokenizer(world["tokenizer"])
    model = build_model(MODEL_PRESETS["tiny"], seed=3, vocab_size=len(tok),
                        image_token_id=image_prefix_ids(tok)[1], pad_token_id=tok.pad_token_id,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id).eval()
    save_checkpoint(model, tmp_path / "ck", tok)
    save_black_feature(tmp_path / "ck",
                       torch.randn(1024, generator=torch.Generator().manual_seed(1)))
    out = export(ExportConfig(checkpoint=tmp_path / "ck", out=tmp_path / "llama"))
    data = tmp_path / "blimp"
    data.mkdir()
    pairs = [("the red cat sees a dog.", "the red cat see a dog."),
             ("a blue fish is here.", "a blue fish are here."),
             ("the dog chases the green bird.", "the dog chase the green bird."),
             ("the cat is here.", "the cat is here.")]  # identical: a tie
    (data / "agreement.jsonl").write_text("".join(
        json.dumps({"sentence_good": g, "sentence_bad": b}) + "\n" for g, b in pairs))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", PIPELINE_RULES, str(out), str(data)], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    pipeline = json.loads(done.stdout.strip().splitlines()[-1])
    [task] = load_tasks([f"minimal_pairs:{data}"], tok, None, checkpoint=tmp_path / "ck")
    ours = score_candidates(load_model(tmp_path / "ck"), task, progress=False).view(-1, 2)
    torch.testing.assert_close(torch.tensor(pipeline["scores"], dtype=torch.float64), ours,
                               rtol=1e-5, atol=1e-4)


PIPELINE_DIR = os.environ.get("BABYMERGE_PIPELINE_DIR")
PIPELINE_PYTHON = os.environ.get("BABYMERGE_PIPELINE_PYTHON")


def _pipeline_task_files(kind: str, folder: Path) -> None:
    """Small files of each text-only kind, in the pipeline's formats, from the world's words."""
    folder.mkdir()
    rows = [(c, a, o) for c in TEXT_COLORS[:3] for a in TEXT_ANIMALS[:2] for o in ("bird", "fish")]
    if kind == "minimal_pairs":  # two BLiMP UIDs (with `field`) in their own files
        for uid, verb in (("agr_sees", "sees"), ("agr_likes", "likes")):
            lines = [{"sentence_good": f"the {c} {a} {verb} a {o}.",
                      "sentence_bad": f"the {c} {a} {verb[:-1]} a {o}.", "field": "morphology",
                      "UID": uid, "linguistics_term": "agreement"} for c, a, o in rows]
            write_jsonl(folder / f"{uid}.jsonl", lines)
    elif kind == "ewok":
        write_jsonl(folder / "colour.jsonl", [
            {"Context1": f"the {a} is {c}.", "Context2": f"the {a} is {o}.",
             "Target1": f"the {c} {a} sees a {o}.", "Target2": f"the {o} {a} sees a {c}.",
             "Domain": f"domain_{a}", "ContextType": "x", "ContextDiff": "x", "TargetDiff": "x"}
            for c, a, o in rows])
    elif kind == "entity_tracking":
        for split in ("regular", "ambiref"):
            write_jsonl(folder / f"{split}.jsonl", [
                {"input_prefix": f"the {c} {a} sees", "options": [f" a {o}.", " the cat.",
                                                                   f" a {c} dog."],
                 "numops": n % 2} for n, (c, a, o) in enumerate(rows)])
    elif kind == "comps":
        write_jsonl(folder / "comps_base.jsonl", [
            {"prefix_acceptable": f"the {c} {a}", "prefix_unacceptable": f"the {o}",
             "property_phrase": f"sees a {o}."} for c, a, o in rows])
    else:  # wug_adj
        write_jsonl(folder / "wug_adj.jsonl", [
            {"sentences": f"the {c} {a} sees a {o}.\tthe {c} {a} finds a {o}.",
             "ratio": (n * 7 % 10) / 10} for n, (c, a, o) in enumerate(rows)])


PIPELINE_TASK = {"minimal_pairs": "blimp", "ewok": "ewok", "entity_tracking": "entity_tracking",
                 "comps": "comps", "wug_adj": "wug_adj"}


@pytest.mark.skipif(not (PIPELINE_DIR and PIPELINE_PYTHON),
                    reason="set BABYMERGE_PIPELINE_DIR to a checkout of babylm/evaluation-pipeline-"
                           "2025 and BABYMERGE_PIPELINE_PYTHON to a Python with its requirements")
@pytest.mark.parametrize("kind", list(PIPELINE_TASK))
def test_the_official_pipeline_scores_the_export_as_babymerge_eval(world, tmp_path, kind):
    """The unmodified pipeline (``--backend causal``) on the export gives babymerge eval's
    per-UID numbers (its report: percent or rho, two decimals), its average, and the same
    predictions item by item."""
    tok = load_tokenizer(world["tokenizer"])
    model = build_model(MODEL_PRESETS["tiny"], seed=5, vocab_size=len(tok),
                        image_token_id=image_prefix_ids(tok)[1], pad_token_id=tok.pad_token_id,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id).eval()
    save_checkpoint(model, tmp_path / "ck", tok)
    save_black_feature(tmp_path / "ck", torch.randn(1024))
    out = export(ExportConfig(checkpoint=tmp_path / "ck", out=tmp_path / "llama"))
    data = tmp_path / "data"
    _pipeline_task_files(kind, data)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([PIPELINE_PYTHON, "-m", "evaluation_pipeline.sentence_zero_shot.run",
                           "--model_path_or_name", str(out), "--backend", "causal", "--task",
                           PIPELINE_TASK[kind], "--data_path", str(data), "--output_dir",
                           str(tmp_path / "results"), "--save_predictions"], cwd=PIPELINE_DIR,
                          env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    (report,) = (tmp_path / "results").rglob("best_temperature_report.txt")
    (predictions,) = (tmp_path / "results").rglob("predictions.json")
    text = report.read_text()
    metric = "SPEARMAN'S RHO" if kind == "wug_adj" else "ACCURACY"
    uids = dict(line.split(": ") for line in text.split(f"### UID {metric}\n")[1]
                .split("\n\n")[0].splitlines())
    average = float(text.split(f"### AVERAGE {metric}\n")[1].split()[0])
    ours = evaluate(EvalConfig(model=tmp_path / "ck", task=[f"{kind}:{data}"], device="cpu",
                               progress=False, predictions=tmp_path / "ours"))
    scale = 1 if kind == "wug_adj" else 100
    name = data.name
    if kind == "wug_adj":  # one correlation, reported under the UID "avg"
        assert float(uids["avg"]) == round(ours["scores"][name], 2)
    else:
        want = {u: round(scale * a, 2) for u, a in ours["groups"][name].items()}
        # entity tracking's report also lists each split's mean among the UIDs
        assert {u: float(a) for u, a in uids.items() if u in want} == want
    assert average == round(scale * ours["scores"][name], 2)
    theirs = json.loads(predictions.read_text())
    mine = json.loads((tmp_path / "ours" / name / "predictions.json").read_text())
    assert {u: [p["pred"] for p in v["predictions"]] for u, v in theirs.items()} == \
        {u: [p["pred"] for p in v["predictions"]] for u, v in mine.items()}


# What the pipeline's multimodal causal path does with one candidate (its dataset.py and
# compute_results.py at bf55c11): processor(text, images, return_offsets_mapping=True), the
# offset rule for the scored tokens, model(input_ids, attention_mask, pixel_values).
SUBMISSION_RULES = r"""
import json, sys
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor
folder, items = sys.argv[1], json.loads(sys.argv[2])
proc = AutoProcessor.from_pretrained(folder, padding_side="right", trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()

def score(sentence, completion, image):
    enc = proc(text=sentence, images=image, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    start = len(sentence) - len(completion) + offsets[0][0]
    mask = torch.tensor([end > start for _, end in offsets])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]),
                       attention_mask=torch.ones(1, len(ids)).long(),
                       pixel_values=torch.FloatTensor(enc["pixel_values"])).logits
    picked = logits[0, :-1].log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    return float((picked * mask[1:]).sum())

scores = [score(sentence, completion, Image.open(path).convert("RGB"))
          for sentence, completion, path in items]
with torch.no_grad():  # text only: no pixel_values, the black feature fills the image slot
    text = model(**{k: torch.tensor([v]) for k, v in proc(text="the cat is here.").items()})
print(json.dumps({"scores": scores, "text_logits": text.logits[0].tolist()}))
"""


@pytest.fixture(scope="module")
def vlm_with_encoder(world, tmp_path_factory):  # noqa: F811
    """A tiny VLM (standardised 64-d features) of a random DINOv2, two images, their features
    (float32: the file then differs from the pixel path only in resizing), its black feature."""
    s = vlm_of_random_encoder(tmp_path_factory.mktemp("submission"), world["tokenizer"],
                              feature_norm="standardize")
    extract_features(ExtractConfig(source=str(s["images"]), out=s["root"] / "f.h5",
                                   encoder=str(s["encoder"]), num_workers=0, dtype="float32",
                                   progress=False))
    save_black_feature(s["vlm"], FeatureTable(s["root"] / "f.h5").black.float())
    return {**s, "features": s["root"] / "f.h5"}


def _run_submission_rules(folder, items, python=sys.executable, tmp=None):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(Path(tmp) / "modules")
    done = subprocess.run([python, "-c", SUBMISSION_RULES, str(folder), json.dumps(items)],
                          env=env, cwd=tmp, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _submission_check(s, tmp_path, python=sys.executable):
    out = export(ExportConfig(checkpoint=s["vlm"], out=tmp_path / "sub", submission=True,
                              encoder=str(s["encoder"])))
    wg, vqa = tmp_path / "wg.jsonl", tmp_path / "vqa.jsonl"
    captions, answers = ["a red cat is here.", "the dog sees the blue fish."], ["a cat", "red"]
    wg.write_text("".join(json.dumps({"image_id": i, "caption_0": captions[0],
                                      "caption_1": captions[1]}) + "\n" for i in "ab"))
    vqa.write_text("".join(json.dumps({"image_id": i, "question": "what is here ?",
                                       "target_ans": answers[0], "distractors": answers[1:]})
                           + "\n" for i in "ab"))
    tasks = load_tasks([f"winoground:{wg}", f"vqa:{vqa}"], s["tokenizer"], s["features"])
    model = load_model(s["vlm"])
    ours = torch.cat([score_candidates(model, t, progress=False) for t in tasks])
    items = [(c, c, str(s["images"] / f"{i}.png")) for i in "ab" for c in captions]
    items += [(f"what is here ? {a}", f" {a}", str(s["images"] / f"{i}.png"))
              for i in "ab" for a in answers]
    got = _run_submission_rules(out, items, python, tmp_path)
    # the feature file's resize (torch, uint8) and the processor's (PIL) differ by at most a grey
    # level: ~1e-5 of a score here
    torch.testing.assert_close(torch.tensor(got["scores"], dtype=torch.float64), ours,
                               rtol=1e-5, atol=1e-3)
    tok = s["tokenizer"]
    ids = torch.tensor([image_prefix_ids(tok) + tok("the cat is here.",
                                                     add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        text = model(input_ids=ids, pixel_values=load_black_feature(s["vlm"])[None]).logits
    torch.testing.assert_close(torch.tensor(got["text_logits"]), text[0], rtol=1e-5, atol=1e-5)


def test_submission_folder_scores_raw_images_as_eval_scores_features(vlm_with_encoder, tmp_path):
    """``export --submission``, loaded through AutoProcessor and AutoModelForCausalLM with
    trust_remote_code in an interpreter without babymerge, scores Winoground- and VQA-format items
    from raw images as ``babymerge eval`` does from the feature file, and text alone with the
    black feature."""
    _submission_check(vlm_with_encoder, tmp_path)


@pytest.mark.skipif(not os.environ.get("BABYMERGE_TRANSFORMERS4_PYTHON"),
                    reason="set BABYMERGE_TRANSFORMERS4_PYTHON to a Python with transformers "
                           "4.51.3 (the BabyLM pipeline's pin), torch and pillow")
def test_submission_folder_in_transformers_4(vlm_with_encoder, tmp_path):
    _submission_check(vlm_with_encoder, tmp_path, os.environ["BABYMERGE_TRANSFORMERS4_PYTHON"])


def test_export_never_replaces_what_it_did_not_write(world, tmp_path):
    """--out an existing file of the user's, or a folder holding their files: refused, nothing
    lost. An earlier export (or checkpoint) in that folder is replaced; the new folder gets the
    permissions a plain mkdir gives, not mkdtemp's private 0700."""
    import stat

    from babymerge.model import OutputError

    tok = load_tokenizer(world["tokenizer"])
    model = build_model(MODEL_PRESETS["tiny"], seed=0, vocab_size=len(tok),
                        image_token_id=image_prefix_ids(tok)[1], pad_token_id=tok.pad_token_id,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    save_checkpoint(model, tmp_path / "ck", tok)
    save_black_feature(tmp_path / "ck", torch.zeros(1024))
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("chapter 1")
    for out, says in ((notes, "exists and is not a folder babymerge wrote"),
                      (mine, r"holds files babymerge did not write \(thesis.tex\)")):
        with pytest.raises(OutputError, match=f"--out {out}: {says}"):
            export(ExportConfig(checkpoint=tmp_path / "ck", out=out))
    assert notes.read_text() == "my notes" and (mine / "thesis.tex").read_text() == "chapter 1"
    first = export(ExportConfig(checkpoint=tmp_path / "ck", out=tmp_path / "export"))
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(first.stat().st_mode) == 0o777 & ~umask
    (first / "model.safetensors").write_bytes(b"stale")
    export(ExportConfig(checkpoint=tmp_path / "ck", out=first))  # its own folder: replaced
    assert (first / "model.safetensors").read_bytes() != b"stale"


def test_submission_refuses_an_encoder_it_cannot_use(vlm_with_encoder, tmp_path):
    """One line naming the encoder: another width, or one that does not load (the checkpoint's
    config names a local encoder by its folder name only)."""
    s = vlm_with_encoder
    other = save_random_dinov2(tmp_path / "enc32", hidden_size=32)
    with pytest.raises(ExportError, match="32-d features, but the checkpoint's projector takes "
                                          "64-d"):
        export(ExportConfig(checkpoint=s["vlm"], out=tmp_path / "a", submission=True,
                            encoder=str(other)))
    with pytest.raises(ExportError, match="--encoder enc: cannot load it"):
        export(ExportConfig(checkpoint=s["vlm"], out=tmp_path / "b", submission=True))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
