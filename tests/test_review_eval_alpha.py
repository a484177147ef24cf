"""--alpha-grid / --keep edge cases: a typed -0 is alpha 0.0 (not -0.0, which named its kept
folder alpha_-0.0 and read "-0.0" in the results)."""

import math

from babymerge.merge_inputs import format_alpha, parse_alpha_grid, parse_keep


def test_negative_zero_is_zero():
    for grid in ("-0,0.5", "-0:1:0.5", "-0.0:0.5:0.5"):
        alphas = parse_alpha_grid(grid)
        assert alphas[0] == 0.0 and math.copysign(1.0, alphas[0]) == 1.0, grid
        assert format_alpha(alphas[0]) == "0.0"
    kept, _ = parse_keep("-0,chosen")
    assert math.copysign(1.0, kept[0]) == 1.0
    grid = parse_alpha_grid("0:1:0.1")
    assert len(grid) == 11 and grid[-1] == 1.0 and [format_alpha(a) for a in grid][3] == "0.3"
