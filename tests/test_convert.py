"""Official PyTorch MST++ checkpoint -> jaxspec workdir (jaxspec.convert).

The parity tests build the official model from ``../shared/reference/mstpp/MST_Plus_Plus.py``
(imported by file path; ``JAXSPEC_REFERENCE`` overrides the folder) with random weights and
skip when torch, einops or the reference code are absent. The rule/error tests need neither.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec import convert
from jaxspec.models.mstpp import MSTPlusPlus


def _target(**kw):
    v = jax.eval_shape(MSTPlusPlus(**kw).init, jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
    return v["params"]


@pytest.fixture(scope="module")
def official():
    """(torch module, reference module) of a randomised official 1-stage MST++."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("einops")
    ref = convert.reference_code("mstpp/MST_Plus_Plus.py")
    if ref is None:
        pytest.skip("official MST++ reference code absent (../shared/reference/mstpp)")
    mod = convert.load_module_from_file(ref)
    torch.manual_seed(0)
    net = mod.MST_Plus_Plus(stage=2).eval()
    with torch.no_grad():   # break the symmetric defaults (rescale 1, LayerNorm (1, 0))
        for name, p in net.named_parameters():
            if name.endswith("rescale"):
                p.copy_(torch.rand_like(p) * 2 + 0.5)
            elif ".norm." in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return net, torch


def _torch_forward(net, torch, x_nhwc):
    with torch.no_grad():
        y = net(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))))
    return y.numpy().transpose(0, 2, 3, 1)


def test_official_checkpoint_matches_torch_forward(official, tmp_path):
    net, torch = official
    path = tmp_path / "mst_plus_plus.pth"
    # what the official training script writes: DataParallel names inside a dict
    torch.save({"epoch": 3, "iter": 1000,
                "state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    sd = convert.load_torch_state_dict(path)
    assert all(not k.startswith("module.") for k in sd)
    cfg, variables = convert.convert_checkpoint("mstpp", sd)
    assert dict(cfg.model) == dict(in_channels=3, out_channels=31, n_feat=31, stage=2)
    assert cfg.rgb_norm == "minmax"
    x = np.random.default_rng(0).uniform(0, 1, (2, 37, 45, 3)).astype(np.float32)  # pads to 8
    want = _torch_forward(net, torch, x)
    got = np.asarray(MSTPlusPlus(stage=2).apply(variables, jnp.asarray(x)))
    assert got.shape == want.shape == (2, 37, 45, 31)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)

    # the CLI writes a workdir that jaxspec.load reads unchanged
    wd = tmp_path / "wd"
    assert convert.main(["mstpp", str(path), "--workdir", str(wd)]) == 0
    conf = json.loads((wd / "config.json").read_text())
    assert conf["rgb_norm"] == "minmax"
    assert json.loads((wd / "converted.json").read_text())["converted_from"].endswith(".pth")
    import jaxspec
    model, loaded = jaxspec.load(wd)
    got2 = np.asarray(model.apply(loaded, jnp.asarray(x)))
    np.testing.assert_allclose(got2, want, atol=1e-5, rtol=1e-5)
    # a second conversion into the same workdir is refused
    assert convert.main(["mstpp", str(path), "--workdir", str(wd)]) == 2


def test_bare_state_dict_and_cli_errors(official, tmp_path, capsys):
    net, torch = official
    sd = net.state_dict()
    path = tmp_path / "bare.pth"
    torch.save(sd, path)
    got = convert.load_torch_state_dict(path)
    assert set(got) == set(sd)
    bad = dict(sd)
    bad["body.0.extra.weight"] = bad.pop("body.1.mapping.weight")
    torch.save(bad, tmp_path / "bad.pth")
    assert convert.main(["mstpp", str(tmp_path / "bad.pth"), "--workdir",
                         str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert "body.0.extra.weight" in err and "body_1/mapping/kernel" in err
    assert convert.main(["mstpp", str(tmp_path / "nope.pth"), "--workdir",
                         str(tmp_path / "w")]) == 2
    assert "not found" in capsys.readouterr().err


def _fake_state_dict(stage=1, c=31):
    """Official-named random tensors for an MST++ (no torch needed): the inverse layouts of
    every rule applied to our own parameter shapes."""
    rng = np.random.default_rng(1)
    target = convert._flatten(_target(stage=stage, n_feat=c, out_channels=c))
    inverse = {"conv": (3, 2, 0, 1), "convT": (2, 3, 0, 1), "linear": (1, 0)}
    names = {}
    for sd_name in _official_names(stage):
        for rule in convert.mstpp_rules():
            p = rule.apply(sd_name)
            if p is not None:
                shape = target[p].shape
                perm = inverse.get(rule.layout)
                tshape = tuple(shape[i] for i in perm) if perm else shape
                names[sd_name] = rng.normal(size=tshape).astype(np.float32)
                break
    return names, target


def _official_names(stage):
    msab = ["0.rescale", "0.to_q.weight", "0.to_k.weight", "0.to_v.weight", "0.proj.weight",
            "0.proj.bias", "0.pos_emb.0.weight", "0.pos_emb.2.weight", "1.norm.weight",
            "1.norm.bias", "1.fn.net.0.weight", "1.fn.net.2.weight", "1.fn.net.4.weight"]
    out = ["conv_in.weight", "conv_out.weight"]
    for s in range(stage):
        b = f"body.{s}."
        out += [b + "embedding.weight", b + "mapping.weight"]
        for lv in range(2):
            out += [f"{b}encoder_layers.{lv}.0.blocks.0.{m}" for m in msab]
            out += [f"{b}encoder_layers.{lv}.1.weight", f"{b}decoder_layers.{lv}.0.weight",
                    f"{b}decoder_layers.{lv}.0.bias", f"{b}decoder_layers.{lv}.1.weight"]
            out += [f"{b}decoder_layers.{lv}.2.blocks.0.{m}" for m in msab]
        out += [f"{b}bottleneck.blocks.0.{m}" for m in msab]
    return out


def test_rules_cover_every_parameter_and_layouts():
    sd, target = _fake_state_dict()
    assert len(sd) == len(target) == 77
    params = convert.convert_state_dict(sd, convert.mstpp_rules(), _target(stage=1))
    flat = convert._flatten(params)
    assert set(flat) == set(target)
    np.testing.assert_array_equal(flat["conv_in/kernel"], sd["conv_in.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(flat["body_0/up_1/kernel"],           # decoder 0 = level 1
                                  sd["body.0.decoder_layers.0.0.weight"].transpose(2, 3, 0, 1))
    np.testing.assert_array_equal(flat["body_0/decoder_0_block_0/msa/to_q/kernel"],
                                  sd["body.0.decoder_layers.1.2.blocks.0.0.to_q.weight"].T)
    np.testing.assert_array_equal(flat["body_0/bottleneck_block_0/ffn/dwconv/kernel"],
                                  sd["body.0.bottleneck.blocks.0.1.fn.net.2.weight"]
                                  .transpose(2, 3, 1, 0))
    assert convert.mstpp_model_kwargs(sd) == dict(in_channels=3, out_channels=31, n_feat=31,
                                                  stage=1)


def test_errors_name_the_keys():
    sd, _ = _fake_state_dict()
    tgt = _target(stage=1)
    bad = dict(sd)
    del bad["body.0.mapping.weight"]
    bad["body.0.surprise.weight"] = np.zeros(3, np.float32)
    with pytest.raises(convert.ConversionError,
                       match=r"unknown checkpoint key.*body\.0\.surprise\.weight.*missing.*"
                             r"body_0/mapping/kernel"):
        convert.convert_state_dict(bad, convert.mstpp_rules(), tgt)
    bad = dict(sd)
    bad["conv_in.weight"] = np.zeros((31, 4, 3, 3), np.float32)
    with pytest.raises(convert.ConversionError, match=r"conv_in\.weight \(31, 4, 3, 3\).*"
                                                      r"conv_in/kernel.*\(3, 3, 3, 31\)"):
        convert.convert_state_dict(bad, convert.mstpp_rules(), tgt)
    bad = dict(sd)
    bad["body.5.mapping.weight"] = sd["body.0.mapping.weight"]
    with pytest.raises(convert.ConversionError, match=r"body_5/mapping/kernel, not a parameter"):
        convert.convert_state_dict(bad, convert.mstpp_rules(), tgt)
    with pytest.raises(convert.ConversionError, match="not an MST\\+\\+ state_dict"):
        convert.mstpp_model_kwargs({"foo.weight": np.zeros(1)})
    with pytest.raises(ValueError, match="no converter for method 'acc'"):
        convert.convert_checkpoint("acc", sd)
