"""babymerge.merge_methods: each merge method against its definition (linear, task arithmetic,
SLERP, DARE, TIES), and DARE's masks independent of device and dtype."""

import math

import torch

from babymerge.merge_methods import MERGE_METHODS


def tensors(seed, *shapes):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=gen) for s in shapes]


SHAPES = [(7, 5), (11,), (3, 4, 2)]


def test_methods_against_their_definitions():
    lm, vlm, base = tensors(0, *SHAPES), tensors(1, *SHAPES), tensors(2, *SHAPES)

    def run(name, alpha, **kw):
        method = MERGE_METHODS[name]([t.clone() for t in lm], [t.clone() for t in vlm],
                                     [t.clone() for t in base], **kw)
        dst = [torch.empty_like(t) for t in lm]
        method.merge_into_(dst, alpha)
        return dst

    for alpha in (0.0, 0.3, 1.0):
        linear = run("linear", alpha)
        for d, a, b in zip(linear, lm, vlm):
            torch.testing.assert_close(d, alpha * a + (1 - alpha) * b)
        # task arithmetic at scale 1, and DARE keeping everything, are the linear merge
        for name in ("task-arithmetic", "dare"):
            for d, ref in zip(run(name, alpha, density=1.0), linear):
                torch.testing.assert_close(d, ref, rtol=1e-5, atol=1e-5)
    for d, a, b, c in zip(run("task-arithmetic", 0.3, scale=2.0), lm, vlm, base):
        torch.testing.assert_close(d, c + 2.0 * (0.3 * (a - c) + 0.7 * (b - c)))
    # slerp: exact endpoints; equal-norm orthogonal vectors keep their norm half way
    for alpha, ref in ((0.0, vlm), (1.0, lm)):
        assert all(torch.equal(d, r) for d, r in zip(run("slerp", alpha), ref))
    x, y = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 3.0])
    half = MERGE_METHODS["slerp"]([x], [y], None)
    out = [torch.empty(2)]
    half.merge_into_(out, 0.5)
    torch.testing.assert_close(out[0], torch.tensor([3 / math.sqrt(2), 3 / math.sqrt(2)]))
    # DARE: about density of each task vector kept, rescaled by 1/density, same masks every call
    dare = MERGE_METHODS["dare"]([t.clone() for t in lm], [t.clone() for t in vlm],
                                 [t.clone() for t in base], density=0.5, seed=3)
    kept = torch.cat([t.flatten() != 0 for t in dare.tau_lm]).float().mean().item()
    assert 0.3 < kept < 0.7
    first, second = run("dare", 0.4, density=0.5, seed=3), run("dare", 0.4, density=0.5, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(dare.tau_lm[0] != 0, dare.tau_vlm[0] != 0)  # independent masks
    nz = dare.tau_lm[0] != 0
    torch.testing.assert_close(dare.tau_lm[0][nz], ((lm[0] - base[0]) / 0.5)[nz])


def test_dare_masks_come_from_a_cpu_generator_whatever_the_device_or_dtype():
    """DARE's masks are uniform draws of a CPU generator seeded per (seed, tensor, model), moved
    to the tensors' device: a sweep resumed on another device (CUDA's generator is another
    stream) or in another dtype keeps its masks."""
    lm, vlm, base = tensors(0, *SHAPES), tensors(1, *SHAPES), tensors(2, *SHAPES)
    seed, density = 3, 0.5
    dare = MERGE_METHODS["dare"]([t.clone() for t in lm], [t.clone() for t in vlm],
                                 [t.clone() for t in base], density=density, seed=seed)
    for i, shape in enumerate(SHAPES):
        for stream, tau in ((2 * i, dare.tau_lm[i]), (2 * i + 1, dare.tau_vlm[i])):
            gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + stream)
            assert torch.equal(tau != 0, torch.rand(shape, generator=gen) < density)
    # the first tensor's mask, fixed: a change of recipe (or of torch's CPU stream) shows here
    assert "".join("1" if k else "0" for k in (dare.tau_lm[0] != 0).flatten().tolist()) == \
        "10110011001001111010101100000100000"
    half = MERGE_METHODS["dare"]([t.bfloat16() for t in lm], [t.bfloat16() for t in vlm],
                                 [t.bfloat16() for t in base], density=density, seed=seed)
    assert all(torch.equal(a != 0, b != 0) for a, b in zip(half.tau_lm, dare.tau_lm))
    assert all(torch.equal(a != 0, b != 0) for a, b in zip(half.tau_vlm, dare.tau_vlm))
    assert MERGE_METHODS["dare"].uses_seed and not MERGE_METHODS["ties"].uses_seed


def test_ties_trims_elects_and_averages():
    base = [torch.zeros(6)]
    lm = [torch.tensor([4.0, -1.0, 2.0, 0.1, -3.0, 0.0])]
    vlm = [torch.tensor([2.0, 3.0, -1.0, 0.2, -1.0, 5.0])]
    ties = MERGE_METHODS["ties"](lm, [vlm[0].clone()], base, density=0.5)
    # top 3 magnitudes each: lm keeps 4, 2, -3; vlm keeps 2, 3, 5
    assert ties.tau_lm[0].tolist() == [4.0, 0.0, 2.0, 0.0, -3.0, 0.0]
    assert ties.tau_vlm[0].tolist() == [2.0, 3.0, 0.0, 0.0, 0.0, 5.0]
    out = [torch.empty(6)]
    ties.merge_into_(out, 0.5)
    # agreeing entries: weighted mean; one survivor: its value; nothing kept: 0
    assert out[0].tolist() == [3.0, 3.0, 2.0, 0.0, -3.0, 5.0]
    ties.merge_into_(out, 0.0)
    assert out[0].tolist() == [2.0, 3.0, 0.0, 0.0, 0.0, 5.0]
