import numpy as np
import pytest

from mlx_grpo.advantages import EPS, group_advantages


def reference(r, G, scale):
    out = []
    r = np.asarray(r, dtype=np.float64)
    for g in range(len(r) // G):
        x = r[g * G:(g + 1) * G]
        if x.max() == x.min():
            out += [0.0] * G
            continue
        d = x - x.mean()
        if scale == "group":
            d = d / (np.sqrt(((x - x.mean()) ** 2).mean()) + EPS)
        elif scale == "batch":
            d = d / (r.std() + EPS)
        out += list(d)
    return np.array(out)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_matches_numpy_formula(scale):
    rng = np.random.default_rng(0)
    r = rng.normal(size=32)
    np.testing.assert_allclose(group_advantages(r, 8, scale), reference(r, 8, scale), rtol=1e-5, atol=1e-6)


def test_group_std_normalised_values():
    a = group_advantages(np.array([1.0, 0.0, 0.0, 0.0]), 4)
    # mean 0.25, population std sqrt(3)/4
    np.testing.assert_allclose(a, np.array([0.75, -0.25, -0.25, -0.25]) / (np.sqrt(3) / 4 + EPS), rtol=1e-6)
    assert a.sum() == pytest.approx(0.0, abs=1e-6)


def test_equal_rewards_give_exact_zero_never_nan():
    r = np.array([0.1] * 3 + [0.7, 0.7, 0.7] + [1.0, 0.0, 0.2])
    a = group_advantages(r, 3)
    assert np.all(np.isfinite(a))
    assert np.all(a[:6] == 0.0)
    assert np.all(a[6:] != 0.0)


def test_rejects_ragged_groups():
    with pytest.raises(ValueError):
        group_advantages(np.zeros(7), 4)
