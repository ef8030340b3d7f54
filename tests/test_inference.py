"""Inference: stride padding, tiled == untiled for a conv model, x8 self-ensemble of an
equivariant function, evaluate_dataset, the notebook API."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec import inference, metrics


class ConvNet(nn.Module):
    """Two 3x3 convs: receptive-field radius 2."""

    @nn.compact
    def __call__(self, rgb, train=False):
        x = nn.gelu(nn.Conv(8, (3, 3))(rgb))
        return jax.nn.softplus(nn.Conv(31, (3, 3))(x)) + 0.01


class StridedNet(nn.Module):
    """Down-samples by 4 and back (needs inputs that are multiples of 4)."""

    @nn.compact
    def __call__(self, rgb, train=False):
        h, w = rgb.shape[1:3]
        assert h % 4 == 0 and w % 4 == 0, (h, w)
        x = nn.Conv(8, (4, 4), strides=4)(rgb)
        x = nn.ConvTranspose(31, (4, 4), strides=(4, 4))(x)
        return x


@pytest.fixture(scope="module")
def conv_fn():
    model = ConvNet()
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
    return inference.make_predict_fn(model.apply, variables)


def _rgb(h, w, b=1, seed=0):
    return np.random.default_rng(seed).random((b, h, w, 3)).astype(np.float32)


def test_tiled_equals_untiled(conv_fn):
    x = _rgb(50, 61)
    full = inference.predict_padded(conv_fn, x)
    tiled = inference.predict_tiled(conv_fn, x, tile=24, overlap=8)
    assert tiled.shape == full.shape == (1, 50, 61, 31)
    # receptive-field radius 2 <= overlap // 4: pixels whose tile lacks context get weight 0
    np.testing.assert_allclose(tiled, full, rtol=0, atol=1e-5)
    # with a stride the reference is the untiled prediction of the reflect-padded image
    tiled_s = inference.predict_tiled(conv_fn, x, tile=24, overlap=8, stride=8)
    full_s = inference.predict_padded(conv_fn, x, stride=8)
    np.testing.assert_allclose(tiled_s, full_s, rtol=0, atol=1e-5)
    # a too-small overlap (margin 0) shows the seams: the blend is then only approximate
    rough = inference.predict_tiled(conv_fn, x, tile=24, overlap=2)
    assert np.abs(rough - full).max() > 1e-3


def test_tiled_errors(conv_fn):
    with pytest.raises(ValueError, match="multiple of the model stride"):
        inference.predict_tiled(conv_fn, _rgb(16, 16), tile=20, overlap=4, stride=8)
    with pytest.raises(ValueError, match="overlap"):
        inference.predict_tiled(conv_fn, _rgb(16, 16), tile=8, overlap=8)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        inference.predict_image(conv_fn, np.zeros((4, 4)))


def test_padding_to_stride_and_crop_back():
    model = StridedNet()
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
    fn = inference.make_predict_fn(model.apply, variables)
    x = _rgb(13, 18)
    out = inference.predict_image(fn, x, stride=4)
    assert out.shape == (1, 13, 18, 31)
    padded = inference.pad_to_stride(x, 4)
    assert padded.shape == (1, 16, 20, 3)
    np.testing.assert_array_equal(padded[:, 13, :18], x[:, 11])   # reflect: row 13 == row 11
    np.testing.assert_allclose(out, np.asarray(fn(padded))[:, :13, :18], rtol=1e-6)
    tiled = inference.predict_image(fn, x, stride=4, tile=8, overlap=4)
    assert tiled.shape == out.shape


def test_self_ensemble_of_equivariant_function_is_identity():
    m = np.random.default_rng(1).random((3, 31)).astype(np.float32)
    pointwise = lambda x: np.asarray(x) @ m        # noqa: E731  (commutes with flips/transpose)
    x = _rgb(9, 14, b=2)
    np.testing.assert_allclose(inference.self_ensemble(pointwise, x), pointwise(x), rtol=1e-6)
    # a non-equivariant function (a shift) is changed by the ensemble
    shift = lambda x: np.roll(np.asarray(x), 1, axis=1)  # noqa: E731
    assert not np.allclose(inference.self_ensemble(shift, x), shift(x))
    # each transform is inverted correctly: ensemble of identity is identity for non-square
    np.testing.assert_allclose(inference.self_ensemble(lambda y: y, x), x, rtol=1e-6)
    med = inference.self_ensemble(pointwise, x, mode="median")
    np.testing.assert_allclose(med, pointwise(x), rtol=1e-6)


def test_ensemble_through_predict_image(conv_fn):
    x = _rgb(12, 20)
    ens = inference.predict_image(conv_fn, x, ensemble=True)
    manual = np.mean([inference._inverse(np.asarray(conv_fn(inference._forward(x, k))), k)
                      for k in range(8)], axis=0)
    np.testing.assert_allclose(ens, manual, rtol=1e-5)
    assert not np.allclose(ens, np.asarray(conv_fn(x)), atol=1e-4)


def test_evaluate_dataset_matches_metrics(conv_fn):
    rng = np.random.default_rng(3)
    batches = []
    for i in range(3):
        rgb = rng.random((1, 24, 24, 3)).astype(np.float32)
        hsi = (rng.random((1, 24, 24, 31)) * 0.5 + 0.2).astype(np.float32)
        batches.append({"rgb": rgb, "hsi": hsi, "name": np.asarray([f"im{i}"])})
    res = inference.evaluate_dataset(conv_fn, batches, crop_border=2, keep=1)
    assert res["num_images"] == 3 and list(res["per_image"]) == ["im0", "im1", "im2"]
    ref = metrics.evaluate_all(np.asarray(conv_fn(batches[1]["rgb"])), batches[1]["hsi"],
                               crop_border=2)
    for k, v in ref.items():
        assert res["per_image"]["im1"][k] == pytest.approx(float(v[0]), rel=1e-5)
        assert res["mean"][k] == pytest.approx(np.mean([r[k] for r in
                                                        res["per_image"].values()]))
    assert len(res["examples"]) == 1 and res["examples"][0][0] == "im0"
    limited = inference.evaluate_dataset(conv_fn, batches, max_images=2)
    assert limited["num_images"] == 2
    with pytest.raises(ValueError, match="no images"):
        inference.evaluate_dataset(conv_fn, [])


def test_reconstruct_bare_module_and_normalisation():
    from jaxspec import api
    model = ConvNet()
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
    img = (np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8)
    with pytest.raises(ValueError, match="normalization"):
        api.reconstruct(model, variables, img)
    cube = api.reconstruct(model, variables, img, normalization="minmax")
    assert cube.shape == (20, 30, 31) and cube.dtype == np.float32
    # min-max normalisation makes the result invariant to affine changes of the RGB
    cube2 = api.reconstruct(model, variables, img.astype(np.float32) * 3 + 7,
                            normalization="minmax")
    np.testing.assert_allclose(cube2, cube, rtol=1e-4, atol=1e-5)
    tiled = api.reconstruct(model, variables, img, normalization="minmax", max_pixels=16 * 16)
    np.testing.assert_allclose(tiled, cube, atol=5e-3)
