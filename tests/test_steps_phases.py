"""Step kind ``phases`` (ordered, each phase sees the previous phase's update; repeat counts;
own optimiser states), general model state, aux losses, ``frozen`` (bitwise unchanged) and
``init_from`` (staged training), independent data streams."""
from __future__ import annotations

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec import registry
from jaxspec.configs.base import Config
from jaxspec.train import optim, steps, train_and_evaluate
from jaxspec.train.state import create_train_state


class AB(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        a = self.param("a", nn.initializers.zeros, ())
        b = self.param("b", nn.initializers.zeros, ())
        return x * 0 + a + b


def _cfg(**kw):
    base = dict(method="t_ab", preset="smoke", steps=10, optimizer="sgd", b1=0.0,
                schedule="constant", lr=0.5, crop=4, batch_size=1)
    base.update(kw)
    return Config(**base)


def test_phases_run_in_order_with_repeats_and_own_optimizers():
    """Phase A: (a - 1)^2 on a (repeat 2, lr 0.25); phase B: (b - a)^2 on b (lr 0.5). B's
    gradient is taken at A's *updated* a: a 0 -> 0.5 -> 0.75, then b 0 -> 0.75."""
    pa = steps.Phase("A", lambda f, v, b, r: ((v["params"]["a"] - 1.0) ** 2, {}), params=("^a$",),
                     optimizer={"lr": 0.25}, repeat=2)
    pb = steps.Phase("B", lambda f, v, b, r: ((v["params"]["b"] - v["params"]["a"]) ** 2,
                                              {"gap": v["params"]["b"] - v["params"]["a"]}),
                     params=("^b$",))
    method = registry.Method(name="t_ab", make_model=lambda m: AB(), presets={},
                             step_kind="phases", step_options={"phases": [pa, pb]})
    cfg = _cfg()
    model = AB()
    tx = steps.make_optimizer_for(cfg, method)
    state = create_train_state(model, tx, jax.random.PRNGKey(0), (1, 4, 4, 3))
    assert set(state.opt_state) == {"A", "B"}
    step = jax.jit(steps.build_train_step(model, cfg, method))
    s1, m = step(state, {"x": jnp.zeros((1, 4, 4, 3))})
    np.testing.assert_allclose(float(s1.params["a"]), 0.75, rtol=1e-6)
    np.testing.assert_allclose(float(s1.params["b"]), 0.75, rtol=1e-6)
    assert set(m) >= {"loss", "loss/A", "loss/B", "B/gap", "grad_norm", "param_norm", "lr"}
    assert int(s1.step) == 1
    with pytest.raises(ValueError, match="select no"):
        bad = steps.Phase("C", pa.loss, params=("^zzz$",))
        steps.make_optimizer_for(cfg, registry.Method(
            name="x", make_model=None, presets={}, step_kind="phases",
            step_options={"phases": [bad]})).init(state.params)


class GanNet(nn.Module):
    """Generator (conv + BatchNorm: model state) + discriminator subtree; returns an aux loss."""

    def setup(self):
        self.gen = nn.Conv(8, (3, 3))
        self.bn = nn.BatchNorm(momentum=0.5)
        self.disc = nn.Dense(1)

    def __call__(self, rgb, train=False):
        y = self.bn(self.gen(rgb), use_running_average=not train)
        out = jax.nn.softplus(y) + 0.01
        if self.is_initializing():
            self.critic(out)                 # create the discriminator's parameters
        return out, {"smooth": jnp.mean(jnp.square(jnp.diff(out, axis=1)))}

    def critic(self, hsi):
        return self.disc(jnp.mean(hsi, axis=(1, 2)))


def _gan_phases():
    def d_loss(apply_fn, variables, batch, rngs):
        fake, _ = apply_fn(variables, batch["rgb"]["rgb"], train=False)
        real = batch["hsi"]["hsi"]
        d = lambda x: apply_fn(variables, x, method=GanNet.critic)  # noqa: E731
        loss = jnp.mean(jax.nn.softplus(-d(real))) + jnp.mean(jax.nn.softplus(d(
            jax.lax.stop_gradient(fake))))
        return loss, {}

    def g_loss(apply_fn, variables, batch, rngs):
        (fake, aux), new = apply_fn(variables, batch["rgb"]["rgb"], train=True,
                                    mutable=["batch_stats"])
        adv = jnp.mean(jax.nn.softplus(-apply_fn(variables, fake, method=GanNet.critic)))
        return adv + 0.1 * aux["smooth"], {"model_state": new, "smooth": aux["smooth"]}

    return [steps.Phase("D", d_loss, params=("^disc/",), optimizer={"lr": 1e-3}),
            steps.Phase("G", g_loss, params=("^(gen|bn)/",))]


def _sources(n, seed, c=8, size=12):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        hsi = (rng.random((size, size, c)) * 0.8 + 0.1).astype(np.float32)
        out.append({"hsi": hsi, "rgb": (hsi @ np.full((c, 3), 1 / c)).astype(np.float32),
                    "bands": np.linspace(400, 700, c).astype(np.float32), "name": f"{seed}_{i}"})
    return out


def test_gan_phases_with_unpaired_streams_model_state_and_resume(tmp_path, monkeypatch, capsys):
    """End to end: D then G in one jitted step over two independent streams (unpaired RGB and
    HSI), BatchNorm statistics as model state saved and restored, resume at step t (CLI)."""
    registry.register(registry.Method(name="t_gan", make_model=lambda m: GanNet(), presets={},
                                      step_kind="phases", step_options={"phases": _gan_phases()}))
    try:
        cfg = Config(method="t_gan", preset="smoke", crop=8, batch_size=2, steps=2, lr=1e-3,
                     log_every=1, eval_every=0, ckpt_every=1, rgb_norm="none",
                     streams={"rgb": {"keys": ["rgb"], "seed": 1},
                              "hsi": {"keys": ["hsi"], "seed": 2}})
        wd = tmp_path / "gan"
        train = {"rgb": _sources(3, 0), "hsi": _sources(3, 1)}
        s = train_and_evaluate(cfg, wd, train_source=train, eval_source=_sources(2, 2),
                               progress=False, figures=0)
        assert s["step"] == 2
        rec = [json.loads(l) for l in (wd / "metrics.jsonl").read_text().splitlines()]
        assert {"loss/D", "loss/G", "G/smooth"} <= set(rec[-1])
        # resume through train.py's CLI (streams and eval data from the patched loader)
        from jaxspec import cli
        registry.register(dataclasses.replace(registry.get("t_gan"),
                                              presets={"smoke": lambda: cfg}))
        monkeypatch.setattr("jaxspec.train.loop.load_sources",
                            lambda config, splits, dataset=None: {
                                s: (_sources(2, 2) if s == config.eval_split else _sources(3, 0))
                                for s in splits})
        assert cli.main(["--method", "t_gan", "--preset", "smoke", "--workdir", str(wd),
                         "--steps", "3", "--no-progress"]) == 0
        s2 = json.loads(capsys.readouterr().out)
        assert s2["start_step"] == 2 and s2["step"] == 3
        import jaxspec
        _, v = jaxspec.load(wd, which="latest")
        assert "batch_stats" in v and not np.allclose(v["batch_stats"]["bn"]["mean"], 0)
    finally:
        registry.unregister("t_gan")


def test_stream_iterators_are_deterministic_and_resumable():
    from jaxspec import tasks
    from jaxspec.train.loop import train_iterator
    cfg = Config(method="m", preset="p", crop=4, batch_size=2, rgb_norm="none",
                 streams={"a": {"keys": ["rgb"], "seed": 1}, "b": {"keys": ["hsi"], "seed": 2}})
    src = {"a": _sources(4, 0), "b": _sources(5, 1)}
    task = tasks.get("rgb2hsi")
    it = train_iterator(cfg, task, src, 2, 0)
    batches = [next(it) for _ in range(3)]
    assert set(batches[0]) == {"a", "b"} and set(batches[0]["a"]) == {"rgb"}
    again = next(train_iterator(cfg, task, src, 2, 2))
    for k in ("a", "b"):
        for key in again[k]:
            np.testing.assert_array_equal(again[k][key], batches[2][k][key])


class EncHead(nn.Module):
    @nn.compact
    def __call__(self, rgb, train=False):
        z = nn.gelu(nn.Conv(6, (3, 3), name="enc")(rgb))
        return jax.nn.softplus(nn.Conv(8, (1, 1), name="head")(z)) + 0.01


def test_init_from_and_frozen_bitwise(tmp_path):
    """Stage 2 initialises 'enc' from stage 1's best checkpoint and freezes it: after training
    'enc' is bitwise the stage-1 value, 'head' moved; both settings are in config.json."""
    import jaxspec
    registry.register(registry.Method(name="t_stage", make_model=lambda m: EncHead(),
                                      presets={}))
    # stage 1 trains with the "groups" kind (enc and head, each its own optimiser)
    sup = steps.supervised_phase_loss(__import__("jaxspec.tasks").tasks.get("rgb2hsi"), None,
                                      Config(method="t_stage1", preset="smoke", loss="l1"))
    labels = lambda p: optim.label_params(p, [("^enc/", "enc")], default="head")  # noqa: E731
    registry.register(registry.Method(
        name="t_stage1", make_model=lambda m: EncHead(), presets={}, step_kind="groups",
        step_options={"param_labels": labels, "losses": {"enc": sup, "head": sup},
                      "groups": {"enc": {}, "head": {"lr": 5e-3}}}))
    try:
        base = Config(method="t_stage", preset="smoke", crop=8, batch_size=2, steps=2, lr=1e-2,
                      log_every=1, eval_every=0, ckpt_every=2, rgb_norm="none")
        w1, w2 = tmp_path / "s1", tmp_path / "s2"
        data = dict(train_source=_sources(3, 0), eval_source=_sources(2, 1), progress=False,
                    figures=0)
        s1 = train_and_evaluate(base.replace(method="t_stage1"), w1, **data)
        assert s1["step"] == 2 and np.isfinite(s1["final_loss"])
        _, v1 = jaxspec.load(w1)
        cfg2 = base.replace(seed=7, frozen=("^enc/",),
                            init_from=({"workdir": str(w1), "subtree": "enc", "target": "enc"},))
        train_and_evaluate(cfg2, w2, **data)
        _, v2 = jaxspec.load(w2, which="latest")
        for k in ("kernel", "bias"):
            np.testing.assert_array_equal(np.asarray(v2["params"]["enc"][k]),
                                          np.asarray(v1["params"]["enc"][k]))
        assert not np.array_equal(np.asarray(v2["params"]["head"]["kernel"]),
                                  np.asarray(v1["params"]["head"]["kernel"]))
        saved = json.loads((w2 / "config.json").read_text())
        assert saved["frozen"] == ["^enc/"] and saved["init_from"][0]["subtree"] == "enc"
        # the same from an .npz variable tree (user-provided weights of one sub-network)
        from jaxspec.train.state import save_variable_tree
        f = save_variable_tree(tmp_path / "enc.npz", {"params": v1["params"]["enc"]})
        train_and_evaluate(cfg2.replace(init_from=({"file": str(f), "target": "enc"},)),
                           tmp_path / "s2f", **data)
        _, v2f = jaxspec.load(tmp_path / "s2f", which="latest")
        for k in ("kernel", "bias"):
            np.testing.assert_array_equal(np.asarray(v2f["params"]["enc"][k]),
                                          np.asarray(v1["params"]["enc"][k]))
        bad = save_variable_tree(tmp_path / "bad.npz", {"enc": v1["params"]["enc"]})
        with pytest.raises(ValueError, match="no 'params' collection"):
            train_and_evaluate(base.replace(init_from=({"file": str(bad), "target": "enc"},)),
                               tmp_path / "s5", **data)
        with pytest.raises(ValueError, match="a 'workdir' or a 'file'"):
            train_and_evaluate(base.replace(init_from=({"target": "enc"},)), tmp_path / "s6",
                               **data)
        with pytest.raises(ValueError, match="no subtree 'nope'"):
            train_and_evaluate(base.replace(init_from=({"workdir": str(w1), "subtree": "nope"},)),
                               tmp_path / "s3", **data)
        with pytest.raises(ValueError, match="matches no parameter"):
            train_and_evaluate(base.replace(frozen=("^zzz/",)), tmp_path / "s4", **data)
    finally:
        registry.unregister("t_stage")
        registry.unregister("t_stage1")
