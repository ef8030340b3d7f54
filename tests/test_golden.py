"""Golden outputs: ``mstpp`` / ``acc`` with seeded weights (``create_model(...).init(seed=0)``)
on a fixed input give the numbers recorded from the code before the Engine II refactor (commit
58f07bc), and their parameter counts are unchanged. Catches silent architecture or init drift."""
from __future__ import annotations

import jax
import numpy as np
import pytest

import jaxspec
from jaxspec.flops import count_params

# Recorded on 58f07bc (main before tasks/model_state), 16x16 input uniform(PRNGKey(1)).
GOLDEN = {
    "mstpp": {"params": 1619625, "collections": ["params"], "sum": -51.984217918943614,
              "abs_sum": 2090.106007243041, "std": 0.3301263624299336,
              "px": [-0.1013919860124588, 0.6061549186706543, -0.10919319093227386]},
    "acc": {"params": 1203265, "collections": ["batch_stats", "params"],
            "sum": -846.3680846739444, "abs_sum": 2070.0630150751094, "std": 0.32727633594742495,
            "px": [0.015511590987443924, -0.34430640935897827, -0.3882349729537964]},
}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_output_and_param_count(name):
    g = GOLDEN[name]
    m = jaxspec.create_model(name, preset="smoke")
    v = m.init(seed=0, image_size=16)
    assert count_params(v["params"]) == g["params"]
    assert sorted(v) == g["collections"]
    x = jax.random.uniform(jax.random.PRNGKey(1), (1, 16, 16, 3))
    y = np.asarray(jax.jit(lambda v, x: m.module.apply(v, x, train=False))(v, x), np.float64)
    assert y.shape == (1, 16, 16, 31)
    np.testing.assert_allclose(y.sum(), g["sum"], rtol=1e-4, atol=2e-2)
    np.testing.assert_allclose(np.abs(y).sum(), g["abs_sum"], rtol=1e-5)
    np.testing.assert_allclose(y.std(), g["std"], rtol=1e-5)
    np.testing.assert_allclose([y[0, 3, 5, 0], y[0, 8, 2, 15], y[0, 15, 15, 30]], g["px"],
                               rtol=1e-4, atol=1e-5)
