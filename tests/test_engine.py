"""Engine: schedules/optimisers, step kinds, parameter groups, BatchNorm, rng streams,
non-finite stop, and 1-device vs 8-simulated-device equality."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxspec import registry
from jaxspec.configs.base import Config, apply_overrides
from jaxspec.train import optim, sharding, steps
from jaxspec.train.state import create_train_state

REPO = Path(__file__).resolve().parents[1]


class TinyNet(nn.Module):
    features: int = 8
    use_bn: bool = False
    dropout: float = 0.0

    @nn.compact
    def __call__(self, rgb, train=False):
        x = nn.Conv(self.features, (3, 3), name="body")(rgb)
        if self.use_bn:
            x = nn.BatchNorm(use_running_average=not train, momentum=0.5, name="bn")(x)
        x = nn.gelu(x)
        if self.dropout:
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return jax.nn.softplus(nn.Conv(31, (3, 3), name="head")(x)) + 0.01


def _config(**kw):
    base = dict(method="engine_tiny", preset="smoke", crop=8, batch_size=4, steps=10, lr=1e-2,
                rgb_norm="none")
    base.update(kw)
    return Config(**base)


def _batch(seed=0, b=4, s=8):
    rng = np.random.default_rng(seed)
    hsi = (rng.random((b, s, s, 31)) * 0.8 + 0.1).astype(np.float32)
    rgb = hsi @ (rng.random((31, 3)).astype(np.float32) / 31)
    return {"rgb": jnp.asarray(rgb), "hsi": jnp.asarray(hsi)}


def _method(**kw):
    return registry.Method(name="engine_tiny", make_model=lambda m: TinyNet(**m),
                           presets={"smoke": _config}, **kw)


# ---------------------------------------------------------------- config / optimiser
def test_apply_overrides_typed_and_errors():
    c = _config()
    c2 = apply_overrides(c, ["steps=7", "lr=3e-4", "grad_clip=none", "eval_tile=64",
                             "model.features=4", "eval_ensemble=true", "dataset=arad1k"])
    assert (c2.steps, c2.lr, c2.grad_clip, c2.eval_tile) == (7, 3e-4, None, 64)
    assert isinstance(c2.steps, int) and isinstance(c2.lr, float)
    assert c2.model == {"features": 4} and c2.eval_ensemble is True and c2.dataset == "arad1k"
    # str fields keep the text: "none" is the RGB normalisation mode, not Python None
    c3 = apply_overrides(c, ["rgb_norm=none", "loss=l1+0.1*mrae"])
    assert (c3.rgb_norm, c3.loss) == ("none", "l1+0.1*mrae")
    with pytest.raises(ValueError, match="unknown config key 'stepz'"):
        apply_overrides(c, ["stepz=3"])
    with pytest.raises(ValueError, match="expected an int"):
        apply_overrides(c, ["steps=1.5"])
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides(c, ["steps"])
    assert Config.from_dict(c2.to_dict()) == c2
    c4 = apply_overrides(c, ["adapt_lr_milestones=[247, 437]"])
    assert c4.adapt_lr_milestones == (247, 437) and Config.from_dict(c4.to_dict()) == c4
    for bad in ("[437, 247]", "[0]", "[5, 5]"):
        with pytest.raises(ValueError, match="adapt_lr_milestones must be increasing"):
            apply_overrides(c, [f"adapt_lr_milestones={bad}"])


def test_schedule_warmup_cosine_and_constant():
    c = _config(steps=100, warmup_steps=10, lr=1e-3, lr_min=1e-5)
    s = optim.make_schedule(c)
    assert float(s(0)) == 0.0
    np.testing.assert_allclose(float(s(5)), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(s(10)), 1e-3, rtol=1e-6)
    # half-way through the cosine part: lr_min + (lr - lr_min) / 2
    np.testing.assert_allclose(float(s(55)), 1e-5 + (1e-3 - 1e-5) / 2, rtol=1e-5)
    np.testing.assert_allclose(float(s(100)), 1e-5, rtol=1e-5)
    s2 = optim.make_schedule(c.replace(warmup_steps=0, schedule="constant"))
    assert float(s2(0)) == float(s2(99)) == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="schedule"):
        optim.make_schedule(c.replace(schedule="linear"))
    with pytest.raises(ValueError, match="optimizer"):
        optim.make_optimizer(c.replace(optimizer="lion"))


def test_grad_clip_limits_update():
    c = _config(optimizer="sgd", b1=0.0, schedule="constant", lr=1.0, grad_clip=0.5)
    tx = optim.make_optimizer(c)
    params = {"w": jnp.zeros(4)}
    grads = {"w": jnp.full(4, 10.0)}
    upd, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(float(optax.global_norm(upd)), 0.5, rtol=1e-6)


# ---------------------------------------------------------------- supervised steps
def test_supervised_step_learns_and_reports():
    method = _method()
    c = _config(steps=30, lr=1e-2)
    model = method.model(c)
    tx = optim.make_optimizer(c)
    state = create_train_state(model, tx, jax.random.PRNGKey(0), (1, 8, 8, 3))
    step = jax.jit(steps.build_train_step(model, c, method), donate_argnums=0)
    batch = _batch()
    losses = []
    for _ in range(30):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert set(m) >= {"loss", "grad_norm", "param_norm", "lr"}
    assert int(state.step) == 30
    assert losses[-1] < 0.6 * losses[0]
    p = float(optax.global_norm(state.params))
    np.testing.assert_allclose(float(m["param_norm"]), p, rtol=1e-6)


def test_batchnorm_stats_updated_and_rng_streams():
    method = _method(rng_streams=("dropout",))
    c = _config(model={"use_bn": True, "dropout": 0.5})
    model = method.model(c)
    state = create_train_state(model, optim.make_optimizer(c), jax.random.PRNGKey(0),
                               (1, 8, 8, 3))
    assert "bn" in state.batch_stats
    mean0 = np.asarray(state.batch_stats["bn"]["mean"]).copy()
    step = jax.jit(steps.build_train_step(model, c, method))
    batch = _batch()
    s1, m1 = step(state, batch)
    assert not np.allclose(np.asarray(s1.batch_stats["bn"]["mean"]), mean0)
    # determinism: the same state and batch give the same result (keys fold in the step)
    s1b, m1b = step(state, batch)
    assert float(m1["loss"]) == float(m1b["loss"])
    # different steps draw different dropout masks
    s2, m2 = step(state.replace(step=state.step + 1), batch)
    assert float(m2["loss"]) != float(m1["loss"])


def test_microbatches_give_the_whole_batch_update():
    """config.microbatches=n: the scan over n micro-batches makes the same update as the
    whole batch (mean of equal-size means); models with BatchNorm statistics are refused;
    the config checks that n divides batch_size."""
    method = _method()
    batch = _batch(b=8)
    out = {}
    for n in (1, 2, 4):
        c = _config(batch_size=8, microbatches=n)
        model = method.model(c)
        state = create_train_state(model, optim.make_optimizer(c), jax.random.PRNGKey(0),
                                   (1, 8, 8, 3))
        step = jax.jit(steps.build_train_step(model, c, method))
        for _ in range(3):
            state, m = step(state, batch)
        out[n] = (state.params, {k: float(v) for k, v in m.items()})
    for n in (2, 4):
        for a, b in zip(jax.tree_util.tree_leaves(out[n][0]), jax.tree_util.tree_leaves(out[1][0])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        for k in ("loss", "grad_norm"):
            assert out[n][1][k] == pytest.approx(out[1][1][k], rel=1e-5), k
    bn = _config(batch_size=8, microbatches=2, model={"use_bn": True})
    model = method.model(bn)
    state = create_train_state(model, optim.make_optimizer(bn), jax.random.PRNGKey(0),
                               (1, 8, 8, 3))
    with pytest.raises(ValueError, match="microbatches=2 needs a model without mutable state"):
        steps.build_train_step(model, bn, method)(state, batch)
    for bad in (3, 0, True):
        with pytest.raises(ValueError, match="microbatches must be a positive integer"):
            _config(batch_size=8, microbatches=bad)
    with pytest.raises(ValueError, match="leading batch axis divisible by 2"):
        steps.split_microbatches({"rgb": jnp.zeros((3, 2))}, 2)
    with pytest.raises(ValueError, match="microbatches=2 is only supported by the 'supervised'"):
        steps.build_train_step(TinyNet(), _config(batch_size=8, microbatches=2),
                               _method(step_kind="phases"))


def test_bfloat16_mixed_precision_step():
    """compute_dtype=bfloat16: bf16 forward/backward, float32 master params, BN stats and loss;
    the loss agrees with the float32 step to bf16 accuracy and training still descends."""
    method = _method()
    batch = _batch()
    out = {}
    for dt in ("float32", "bfloat16"):
        c = _config(compute_dtype=dt, model={"use_bn": True})
        model = method.model(c)
        state = create_train_state(model, optim.make_optimizer(c), jax.random.PRNGKey(0),
                                   (1, 8, 8, 3))
        step = jax.jit(steps.build_train_step(model, c, method))
        losses = []
        for _ in range(20):
            state, m = step(state, batch)
            losses.append(float(m["loss"]))
        leaves = jax.tree.leaves((state.params, state.batch_stats, state.opt_state))
        assert all(l.dtype != jnp.bfloat16 for l in leaves)
        out[dt] = losses
    f32, bf16 = np.array(out["float32"]), np.array(out["bfloat16"])
    assert abs(bf16[0] - f32[0]) < 2e-2 * f32[0]          # same function, bf16 rounding only
    assert bf16[0] != f32[0]                                # and it really ran in bf16
    assert bf16[-1] < 0.7 * bf16[0]
    with pytest.raises(ValueError, match="compute_dtype"):
        steps.build_train_step(method.model(_config()), _config(compute_dtype="float16"), method)


@pytest.mark.parametrize("name,small", [("acc", {"num_blocks": (1, 1, 1)}), ("mstpp", {"stage": 1})])
def test_bfloat16_step_on_registered_models(name, small):
    """The real models compute in bf16 under the mixed-precision step (their input cast must
    not turn the bf16 RGB back into float32: conv of f32 input with a bf16 kernel is an error)."""
    import jaxspec
    m = jaxspec.create_model(name, preset="smoke", compute_dtype="bfloat16", **small)
    c = m.config
    state = create_train_state(m.module, optim.make_optimizer(c), jax.random.PRNGKey(0),
                               (1, 16, 16, 3))
    step = jax.jit(steps.build_train_step(m.module, c, m.method))
    batch = _batch(b=2, s=16)
    state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(state.params))
    bf = steps.cast_floating(state.params, jnp.bfloat16)
    out = m.apply({**state.variables, "params": bf}, batch["rgb"].astype(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16


def test_step_kind_registry():
    assert {"supervised", "groups"} <= set(steps.step_kinds())
    with pytest.raises(ValueError, match="unknown step kind 'nope'"):
        steps.build_train_step(None, _config(), _method(step_kind="nope"))
    seen = {}

    @steps.register_step_kind("engine_test_kind")
    def builder(model, config, method):
        seen["called"] = (model, config.steps, method.name)
        return lambda state, batch: (state, {"loss": 0.0})

    try:
        fn = steps.build_train_step("M", _config(steps=3), _method(step_kind="engine_test_kind"))
        assert seen["called"] == ("M", 3, "engine_tiny")
        assert fn(1, {}) == (1, {"loss": 0.0})
    finally:
        steps._STEP_BUILDERS.pop("engine_test_kind")


def test_module_factory_and_standard_presets():
    make = registry.module_factory(TinyNet, "Tiny")
    assert make.allowed_keys == ("features", "use_bn", "dropout")
    assert make({"features": 4}).features == 4
    with pytest.raises(ValueError, match=r"unknown Tiny model options \['feature'\]"):
        make({"feature": 4})
    # JSON round trips turn tuples into lists; Flax fields must stay hashable tuples
    acc_make = registry.get("acc").make_model
    assert acc_make({"num_blocks": [1, 2, 1]}).num_blocks == (1, 2, 1)
    presets = registry.standard_presets("jaxspec.configs.acc")
    assert set(presets) == {"paper", "cpu", "smoke"}
    assert presets["cpu"]().method == "acc"
    with pytest.raises(ValueError, match="lacks the required preset"):
        registry.standard_presets("jaxspec.configs.base")


# ---------------------------------------------------------------- parameter groups
class TwoPart(nn.Module):
    """Generator-like 'gen' conv and a second 'aux' conv (e.g. a discriminator / degradation
    model), so two groups can be trained from different losses."""

    @nn.compact
    def __call__(self, rgb, train=False):
        gen = nn.Conv(31, (1, 1), name="gen")
        aux = nn.Conv(31, (1, 1), name="aux")
        return gen(rgb), aux(rgb)


def _labels(params):
    return optim.label_params(params, [(r"^aux/", "aux"), (r"^gen/", "gen")], default="other")


def test_label_params_paths():
    params = TwoPart().init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 3)))["params"]
    labels = _labels(params)
    assert labels["gen"]["kernel"] == "gen" and labels["aux"]["bias"] == "aux"


def _group_state(groups, config):
    model = TwoPart()
    tx = optim.make_optimizer(config, param_labels=_labels, groups=groups)
    params = model.init(jax.random.PRNGKey(1), jnp.zeros((1, 4, 4, 3)))["params"]
    from jaxspec.train.state import TrainState
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      model_state={}, rng=jax.random.PRNGKey(2), apply_fn=model.apply, tx=tx)


def _loss_gen(apply_fn, variables, batch, rngs):
    g, _ = apply_fn(variables, batch["rgb"])
    return jnp.mean((g - batch["hsi"]) ** 2), {}


def _loss_aux(apply_fn, variables, batch, rngs):
    # depends on BOTH groups; only the aux group must move from this loss
    g, a = apply_fn(variables, batch["rgb"])
    return jnp.mean(jnp.abs(a - 0.5 * g)), {}


def test_frozen_group_does_not_change():
    c = _config(lr=1e-1, schedule="constant")
    state = _group_state({"gen": {}, "aux": None}, c)
    step = jax.jit(steps.group_step(_labels, {"gen": _loss_gen, "aux": _loss_aux}))
    new, m = step(state, _batch(b=2, s=4))
    np.testing.assert_array_equal(new.params["aux"]["kernel"], state.params["aux"]["kernel"])
    np.testing.assert_array_equal(new.params["aux"]["bias"], state.params["aux"]["bias"])
    assert not np.allclose(new.params["gen"]["kernel"], state.params["gen"]["kernel"])
    assert {"loss/gen", "loss/aux", "grad_norm"} <= set(m)


def test_two_optimizers_each_group_from_its_own_loss():
    c = _config(schedule="constant", lr=1e-2)
    groups = {"gen": {"optimizer": "adam", "lr": 1e-2},
              "aux": {"optimizer": "sgd", "b1": 0.0, "lr": 0.3}}
    state = _group_state(groups, c)
    batch = _batch(b=2, s=4)
    new, _ = jax.jit(steps.group_step(_labels, {"gen": _loss_gen, "aux": _loss_aux}))(state, batch)

    p0 = state.params
    variables = lambda p: {"params": p}  # noqa: E731
    g_gen = jax.grad(lambda p: _loss_gen(state.apply_fn, variables(p), batch, {})[0])(p0)
    g_aux = jax.grad(lambda p: _loss_aux(state.apply_fn, variables(p), batch, {})[0])(p0)
    # aux group: plain SGD on d loss_aux / d aux only
    for k in ("kernel", "bias"):
        np.testing.assert_allclose(new.params["aux"][k], p0["aux"][k] - 0.3 * g_aux["aux"][k],
                                   rtol=1e-5, atol=1e-7)
    # gen group: Adam (first step = -lr * sign-like g/(|g|+eps)) on d loss_gen / d gen only,
    # i.e. unaffected by loss_aux although loss_aux depends on gen
    adam = optax.adam(1e-2)
    upd, _ = adam.update(g_gen["gen"], adam.init(p0["gen"]), p0["gen"])
    for k in ("kernel", "bias"):
        np.testing.assert_allclose(new.params["gen"][k], p0["gen"][k] + upd[k], rtol=1e-5,
                                   atol=1e-7)


def test_groups_kind_via_registry_and_missing_label():
    c = _config(schedule="constant")
    method = registry.Method(
        name="engine_groups", make_model=lambda m: TwoPart(), presets={"smoke": _config},
        step_kind="groups", step_options={"param_labels": _labels,
                                          "losses": {"gen": _loss_gen, "aux": _loss_aux},
                                          "groups": {"gen": {}, "aux": None}})
    tx = steps.make_optimizer_for(c, method)
    step = steps.build_train_step(TwoPart(), c, method)
    params = TwoPart().init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 3)))["params"]
    tx.init(params)
    assert callable(step)
    bad = optim.make_optimizer(c, param_labels=_labels, groups={"gen": {}})
    with pytest.raises(ValueError, match="no entry in groups"):
        bad.init(params)


# ---------------------------------------------------------------- sharding
def test_mesh_and_batch_sharding_errors():
    mesh = sharding.make_mesh()
    assert mesh.axis_names == ("data",)
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,)
    with pytest.raises(ValueError, match="not divisible"):
        sharding.local_batch_size(3, _FakeMesh(2))
    arr = sharding.shard_batch({"rgb": np.zeros((2, 4, 4, 3), np.float32), "name": ["a", "b"]},
                               mesh)
    assert set(arr) == {"rgb"} and arr["rgb"].shape == (2, 4, 4, 3)


class _FakeMesh:
    def __init__(self, n):
        self.devices = np.empty(n)


_MULTI_DEVICE_SCRIPT = textwrap.dedent("""
    import json, sys
    import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
    from jaxspec import registry
    from jaxspec.configs.base import Config
    from jaxspec.train import optim, sharding, steps
    from jaxspec.train.state import create_train_state

    class Net(nn.Module):
        @nn.compact
        def __call__(self, rgb, train=False):
            x = nn.gelu(nn.Conv(8, (3, 3))(rgb))
            x = nn.BatchNorm(use_running_average=not train)(x)
            return jax.nn.softplus(nn.Conv(31, (3, 3))(x)) + 0.01

    cfg = Config(method="m", preset="smoke", crop=8, batch_size=8, steps=5, lr=1e-2,
                 grad_clip=1.0)
    method = registry.Method(name="m", make_model=lambda m: Net(), presets={})
    mesh = sharding.make_mesh()
    rep = sharding.replicated(mesh)
    model = Net()
    state = create_train_state(model, optim.make_optimizer(cfg), jax.random.PRNGKey(0),
                               (1, 8, 8, 3), out_sharding=rep)
    step = jax.jit(steps.build_train_step(model, cfg, method), donate_argnums=0,
                   out_shardings=(rep, rep))
    rng = np.random.default_rng(0)
    out = []
    for t in range(5):
        hsi = (rng.random((8, 8, 8, 31)) * 0.8 + 0.1).astype(np.float32)
        rgb = (hsi @ (np.linspace(0, 1, 93).reshape(31, 3) / 31)).astype(np.float32)
        batch = sharding.shard_batch({"rgb": rgb, "hsi": hsi}, mesh)
        state, m = step(state, batch)
        out.append(float(m["loss"]))
    from jaxspec.train.loop import shard_nested
    nested = shard_nested({"a": {"rgb": rgb}, "b": {"hsi": hsi}}, mesh)

    class Plain(nn.Module):                      # no batch statistics: micro-batches allowed
        @nn.compact
        def __call__(self, rgb, train=False):
            return jax.nn.softplus(nn.Conv(31, (3, 3))(nn.gelu(nn.Conv(8, (3, 3))(rgb)))) + 0.01

    micro = {}
    for n in (1, 2):
        c = cfg.replace(batch_size=16, microbatches=n)
        st = create_train_state(Plain(), optim.make_optimizer(c), jax.random.PRNGKey(0),
                                (1, 8, 8, 3), out_sharding=rep)
        stp = jax.jit(steps.build_train_step(Plain(), c, method), donate_argnums=0,
                      out_shardings=(rep, rep))
        r2 = np.random.default_rng(1)
        micro[n] = []
        for t in range(3):
            hsi = (r2.random((16, 8, 8, 31)) * 0.8 + 0.1).astype(np.float32)
            rgb = (hsi @ (np.linspace(0, 1, 93).reshape(31, 3) / 31)).astype(np.float32)
            st, m = stp(st, sharding.shard_batch({"rgb": rgb, "hsi": hsi}, mesh))
            micro[n].append(float(m["loss"]))
    print(json.dumps({"devices": jax.device_count(), "losses": out,
                      "micro_losses": micro[2], "whole_losses": micro[1],
                      "sharding": str(batch["rgb"].sharding.spec),
                      "nested": str(nested["b"]["hsi"].sharding.spec)}))
""")


def _run_devices(n, tmp_path):
    script = tmp_path / "multi.py"
    script.write_text(_MULTI_DEVICE_SCRIPT)
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
    r = subprocess.run([sys.executable, str(script)], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_one_vs_eight_devices_same_losses(tmp_path):
    one, eight = _run_devices(1, tmp_path), _run_devices(8, tmp_path)
    assert one["devices"] == 1 and eight["devices"] == 8
    assert "data" in eight["sharding"] and "data" in eight["nested"]   # stream batches too
    np.testing.assert_allclose(eight["losses"], one["losses"], rtol=0, atol=1e-5)
    assert one["losses"][-1] < one["losses"][0]
    # config.microbatches=2: the same numbers on 1 and 8 devices, and as the whole batch
    np.testing.assert_allclose(eight["micro_losses"], one["micro_losses"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(one["micro_losses"], one["whole_losses"], rtol=0, atol=1e-5)


# ---------------------------------------------------------------- tensorboard / api
def _event_classes():
    """tensorflow.Event / Summary message classes built from a descriptor (the field numbers
    of tensorflow/core/util/event.proto and summary.proto), parsed by the protobuf runtime."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    fdp = descriptor_pb2.FileDescriptorProto(name="ev_test.proto", package="t")
    F = descriptor_pb2.FieldDescriptorProto
    val = fdp.message_type.add(name="Value")
    val.field.add(name="tag", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    val.field.add(name="simple_value", number=2, type=F.TYPE_FLOAT, label=F.LABEL_OPTIONAL)
    summ = fdp.message_type.add(name="Summary")
    summ.field.add(name="value", number=1, type=F.TYPE_MESSAGE, type_name=".t.Value",
                   label=F.LABEL_REPEATED)
    ev = fdp.message_type.add(name="Event")
    ev.field.add(name="wall_time", number=1, type=F.TYPE_DOUBLE, label=F.LABEL_OPTIONAL)
    ev.field.add(name="step", number=2, type=F.TYPE_INT64, label=F.LABEL_OPTIONAL)
    ev.field.add(name="file_version", number=3, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    ev.field.add(name="summary", number=5, type=F.TYPE_MESSAGE, type_name=".t.Summary",
                 label=F.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("t.Event"))


def test_tensorboard_event_file(tmp_path):
    import struct
    from jaxspec.train.tensorboard import SummaryWriter, crc32c, masked_crc
    assert crc32c(b"123456789") == 0xE3069283          # CRC-32C check value
    w = SummaryWriter(tmp_path)
    w.scalars(7, {"train/loss": 0.25, "val/mrae": 1.5})
    w.close()
    data = w.path.read_bytes()
    Event = _event_classes()
    events, pos = [], 0
    while pos < len(data):
        (n,) = struct.unpack("<Q", data[pos:pos + 8])
        assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == masked_crc(data[pos:pos + 8])
        payload = data[pos + 12:pos + 12 + n]
        assert struct.unpack("<I", data[pos + 12 + n:pos + 16 + n])[0] == masked_crc(payload)
        events.append(Event.FromString(payload))
        pos += 16 + n
    assert events[0].file_version == "brain.Event:2"
    assert events[1].step == 7
    vals = {v.tag: v.simple_value for v in events[1].summary.value}
    assert vals == {"train/loss": 0.25, "val/mrae": 1.5}


def test_create_model_overrides():
    import jaxspec
    method = _method()
    registry.register(method)
    try:
        m = jaxspec.create_model("engine_tiny", preset="smoke", steps=3, features=4)
        assert m.config.steps == 3 and m.config.model == {"features": 4}
        v = m.init(seed=0)
        assert v["params"]["body"]["kernel"].shape == (3, 3, 3, 4)
        with pytest.raises(ValueError, match="no preset 'paper'"):
            jaxspec.create_model("engine_tiny", preset="paper")
    finally:
        registry.unregister("engine_tiny")
