"""babymerge.merge_groups: parameter groups (presets cover every tensor once; a custom spec
names what it cannot place), the coordinate search (finds a known optimum, marks its probes),
the Pareto front, and merge --groups end to end (its uniform start equals the uniform merge, the
kept best point equals a per-group merge of the files on disk, a rerun scores nothing)."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from babymerge.merge import MergeConfig, merge
from babymerge.merge_groups import coordinate_search, pareto_front, parse_groups, point_key
from babymerge.merge_inputs import MergeError
from babymerge.model import MODEL_PRESETS, build_model
from fixtures import eval_world  # noqa: F401  (fixture)

IDS = dict(vocab_size=300, image_token_id=4, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def six_layer_names():
    preset = MODEL_PRESETS["tiny"]
    model = build_model(dataclasses.replace(preset, num_layers=6), seed=0, **IDS)
    return [n for n, _ in model.named_parameters()]


@pytest.mark.parametrize("spec", ["kind", "depth"])
def test_presets_place_every_tensor_once(spec):
    names = six_layer_names()
    groups = parse_groups(spec, names)
    placed = sorted(i for idx in groups.members.values() for i in idx)
    assert placed == list(range(len(names)))
    if spec == "depth":  # six layers in thirds: 0-1, 2-3, 4-5
        for third, layers in (("lower", {0, 1}), ("middle", {2, 3}), ("upper", {4, 5})):
            assert {int(names[i].split(".layers.")[1].split(".")[0])
                    for i in groups.members[third]} == layers
        assert {names[i] for i in groups.members["head"]} == {"lm_head.weight",
                                                             "model.language_model.norm.weight"}
    else:
        assert all("self_attn" in names[i] for i in groups.members["attention"])
        assert len(groups.members["projector"]) == 4


def test_a_custom_spec_names_what_it_cannot_place():
    names = six_layer_names()
    with pytest.raises(MergeError, match="matches 0 groups"):
        parse_groups("attn=self_attn;mlp=mlp", names)
    with pytest.raises(MergeError, match="matches 2 groups"):
        parse_groups("a=layers;b=self_attn;rest=embed|norm|lm_head|projector|mlp", names)
    with pytest.raises(MergeError, match="not a regular expression"):
        parse_groups("a=layers[", names)
    with pytest.raises(MergeError, match="match no merged tensor"):
        parse_groups("all=.;nothing=xyz", names)
    groups = parse_groups("text=language_model|lm_head;image=projector", names)
    assert [len(m) for m in groups.members.values()] == [len(names) - 4, 4]


def test_coordinate_search_climbs_to_a_known_optimum_and_marks_its_probes():
    target = {"a": 0.75, "b": 0.25, "c": 0.5}
    calls = []

    def score(alphas):
        calls.append(dict(alphas))
        return {"group_alphas": dict(alphas),
                "objective": -sum((alphas[g] - target[g]) ** 2 for g in target)}

    tried = coordinate_search(list(target), 0.5, [0, 0.25, 0.5, 0.75, 1], 5, score)
    best = [r for r in tried if r["best"]]
    assert len(best) == 1 and best[0]["group_alphas"] == target
    assert len({point_key(r["group_alphas"]) for r in tried}) == len(tried)  # each once
    probes = [r for r in tried if "probe" in r]
    assert len(probes) == 3 * 4 and all(r["round"] == 1 for r in probes)
    assert all(sum(r["group_alphas"][g] != 0.5 for g in target) == 1 for r in probes)
    assert tried[0]["round"] == 0 and tried[0]["group_alphas"] == dict.fromkeys(target, 0.5)


def test_pareto_front_keeps_only_the_undominated():
    points = [{"g": 0.9, "m": 0.3}, {"g": 0.8, "m": 0.5}, {"g": 0.7, "m": 0.4},
              {"g": 0.9, "m": 0.3}, {"g": 0.6, "m": 0.6}]
    assert pareto_front(points, ["g", "m"]) == [4, 1, 0, 3]  # 2 is beaten by 1


def test_merge_groups_end_to_end(eval_world, tmp_path):
    world = eval_world
    cfg = MergeConfig(lm=world.lm, vlm=[world.vlm], features=world.features,
                      task=list(world.specs.values()), out=tmp_path / "m", alpha_grid="0,0.5,1",
                      keep="none", groups="text=language_model|lm_head;image=projector",
                      group_grid="0,0.5,1", group_rounds=2, progress=False)
    results = merge(cfg)
    g = results["groups"]
    uniform = {r["alpha"]: r for r in results["records"]}
    start = g["points"][0]
    assert start["round"] == 0
    # every group at the uniform alpha: the same model as the uniform merge, the same scores
    assert start["scores"] == uniform[start["group_alphas"]["text"]]["scores"]
    best = next(p for p in g["points"] if p["best"])
    assert g["best"] == point_key(best["group_alphas"])
    assert {"vs_vlm", "vs_lm"} <= set(best["intervals"])
    # the kept best point is the per-group merge of the files on disk
    lm, vlm = (load_file(str(d / "model.safetensors")) for d in (world.lm, world.vlm))
    kept = load_file(str(tmp_path / "m" / "groups_best" / "model.safetensors"))
    provenance = json.loads((tmp_path / "m" / "groups_best" / "merge.json").read_text())
    assert provenance["group_alphas"] == best["group_alphas"]
    for name, tensor in kept.items():
        if name not in lm:
            continue
        a = best["group_alphas"]["image" if "projector" in name else "text"]
        torch.testing.assert_close(tensor, torch.lerp(vlm[name], lm[name], a),
                                   rtol=1e-6, atol=1e-6)
    assert g["pareto"] and all(set(p) >= {"point", "grammar", "multimodal"} for p in g["pareto"])
    assert (tmp_path / "m" / "pareto.png").is_file()
    assert "## Per-group alphas" in (tmp_path / "m" / "results.md").read_text()
    lines = (tmp_path / "m" / "metrics.jsonl").read_text().count("\n")
    again = merge(cfg)  # every point logged and the best kept: nothing scored or saved again
    assert (tmp_path / "m" / "metrics.jsonl").read_text().count("\n") == lines
    assert again["groups"]["best"] == g["best"]


def test_groups_need_one_vlm_and_linear_merging(eval_world):
    with pytest.raises(ValueError, match="--groups: searches one --vlm"):
        MergeConfig(lm=eval_world.lm, vlm=[eval_world.vlm, eval_world.base], task=["blimp:x"],
                    groups="kind")
    with pytest.raises(ValueError, match="--groups: searches one --vlm"):
        MergeConfig(lm=eval_world.lm, vlm=[eval_world.vlm], task=["blimp:x"], groups="kind",
                    method="slerp")
