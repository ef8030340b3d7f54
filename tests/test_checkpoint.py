"""Checkpoints: save/restore round trip, keep-last-N, best-by-MRAE, resume after SIGKILL gives
the same parameters as an uninterrupted run, SIGTERM saves before exit, non-finite loss stops
and leaves the last good checkpoint."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec.train.checkpointing import Checkpointer, has_checkpoint

REPO = Path(__file__).resolve().parents[1]

# A tiny registered method + an in-memory data source whose reads are slowed down (so a run can
# be killed half-way); the computation is unaffected by the delay.
_TRAIN_SCRIPT = textwrap.dedent("""
    import json, sys, time
    import flax.linen as nn, jax, numpy as np
    from jaxspec import registry
    from jaxspec.configs.base import Config
    from jaxspec.train import train_and_evaluate

    class Net(nn.Module):
        @nn.compact
        def __call__(self, rgb, train=False):
            x = nn.gelu(nn.Conv(8, (3, 3))(rgb))
            x = nn.Dropout(0.2, deterministic=not train)(x)
            return jax.nn.softplus(nn.Conv(31, (3, 3))(x)) + 0.01

    class SlowSource:
        def __init__(self, n, seed, delay):
            rng = np.random.default_rng(seed)
            self.items = []
            for i in range(n):
                hsi = (rng.random((12, 12, 31)) * 0.8 + 0.1).astype(np.float32)
                rgb = (hsi @ (np.linspace(0, 1, 93).reshape(31, 3) / 31)).astype(np.float32)
                self.items.append({"rgb": rgb, "hsi": hsi, "name": f"s{seed}_{i}"})
            self.delay = delay
        def __len__(self):
            return len(self.items)
        def __getitem__(self, i):
            time.sleep(self.delay)
            return self.items[i]

    workdir, steps, delay, lr = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
    ckpt_every = int(sys.argv[5]) if len(sys.argv) > 5 else 3
    cfg = Config(method="ckpt_tiny", preset="smoke", crop=8, batch_size=2, steps=steps, lr=lr,
                 rgb_norm="minmax", log_every=1, eval_every=0, ckpt_every=ckpt_every, keep_last=2,
                 optimizer="sgd" if lr > 1 else "adam", schedule="constant" if lr > 1 else "cosine")
    registry.register(registry.Method(name="ckpt_tiny", make_model=lambda m: Net(),
                                      presets={"smoke": lambda: cfg}, rng_streams=("dropout",)))
    try:
        summary = train_and_evaluate(cfg, workdir, train_source=SlowSource(5, 0, delay),
                                     eval_source=SlowSource(2, 1, 0.0), progress=False, figures=0)
    except FloatingPointError as e:
        print("NONFINITE:" + str(e), flush=True)
        sys.exit(3)
    print("SUMMARY:" + json.dumps(summary, default=str), flush=True)
""")


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")


def _script(tmp_path) -> Path:
    p = tmp_path / "train_tiny.py"
    p.write_text(_TRAIN_SCRIPT)
    return p


def _run(tmp_path, workdir, steps, delay=0.0, lr=1e-2, ckpt_every=3, timeout=300):
    r = subprocess.run([sys.executable, str(_script(tmp_path)), str(workdir), str(steps),
                        str(delay), str(lr), str(ckpt_every)], cwd=REPO, env=_env(), capture_output=True,
                       text=True, timeout=timeout)
    return r


def _summary(r):
    assert r.returncode == 0, r.stderr[-3000:]
    line = [l for l in r.stdout.splitlines() if l.startswith("SUMMARY:")][-1]
    return json.loads(line[len("SUMMARY:"):])


def _latest_params(workdir):
    with Checkpointer(Path(workdir) / "checkpoints", read_only=True) as ck:
        step = ck.latest_step()
        variables, meta = ck.restore_variables(which="latest", step=step)
    return step, jax.tree.map(np.asarray, variables["params"]), meta


def _committed_steps(workdir):
    d = Path(workdir) / "checkpoints" / "latest"
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir()
                  if p.name.isdigit() and (p / "_CHECKPOINT_METADATA").exists())


# ------------------------------------------------------------------------- unit level
def test_roundtrip_keep_last_and_best(tmp_path):
    tree = {"step": jnp.asarray(0, jnp.int32), "params": {"w": jnp.arange(6.0).reshape(2, 3)},
            "opt_state": ({"mu": jnp.ones(3)},), "batch_stats": {}, "rng": jax.random.PRNGKey(3)}
    ck = Checkpointer(tmp_path / "run" / "checkpoints", keep_last=2)
    assert not has_checkpoint(tmp_path / "run")
    for s in (1, 2, 3):
        t = jax.tree.map(lambda x: x + s if x.dtype == jnp.float32 else x, tree)
        ck.save(s, t, {"data_step": s})
    for s, mrae in ((1, 0.5), (2, 0.2), (3, 0.4)):
        ck.save_best(s, {"params": {"w": jnp.full((2, 3), float(s))}, "batch_stats": {}},
                     {"mrae": mrae, "psnr": 20.0}, {"step": s})
    ck.wait()
    assert ck.all_steps() == [2, 3] and ck.latest_step() == 3
    assert ck.best_step() == 2
    restored, meta = ck.restore(tree)
    assert meta["data_step"] == 3
    np.testing.assert_array_equal(restored["params"]["w"], np.arange(6.0).reshape(2, 3) + 3)
    np.testing.assert_array_equal(restored["rng"], tree["rng"])
    best, bmeta = ck.restore_variables()
    np.testing.assert_array_equal(best["params"]["w"], np.full((2, 3), 2.0))
    assert bmeta["metrics"]["mrae"] == pytest.approx(0.2)
    ck.close()
    assert has_checkpoint(tmp_path / "run")
    with pytest.raises(ValueError, match="keep_last"):
        Checkpointer(tmp_path / "d", keep_last=0)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Checkpointer(tmp_path / "e").restore(tree)


# ------------------------------------------------------------------------- process level
def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    steps = 15
    ref = _summary(_run(tmp_path, tmp_path / "ref", steps))
    assert ref["step"] == steps and ref["start_step"] == 0

    work = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(_script(tmp_path)), str(work), str(steps),
                             "0.15", "1e-2"], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not any(s >= 6 for s in _committed_steps(work)):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    killed_at = max(_committed_steps(work))
    assert 6 <= killed_at < steps

    resumed = _summary(_run(tmp_path, work, steps))
    assert resumed["start_step"] == killed_at and resumed["step"] == steps
    s_ref, p_ref, _ = _latest_params(tmp_path / "ref")
    s_res, p_res, meta = _latest_params(work)
    assert s_ref == s_res == steps and meta["data_step"] == steps
    for a, b in zip(jax.tree.leaves(p_ref), jax.tree.leaves(p_res)):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
    # the run's outputs exist
    assert (work / "eval.json").is_file() and (work / "config.json").is_file()
    assert json.loads((work / "eval.json").read_text())["num_images"] == 2


def test_sigterm_saves_before_exit(tmp_path):
    work = tmp_path / "term"
    proc = subprocess.Popen([sys.executable, str(_script(tmp_path)), str(work), "200", "0.1",
                             "1e-2"], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        metrics = work / "metrics.jsonl"
        while time.time() < deadline:       # wait until a few steps have run, not on a boundary
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 4:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads([l for l in out.splitlines() if l.startswith("SUMMARY:")][-1][8:])
    assert summary["preempted"] is True and 4 <= summary["step"] < 200
    assert max(_committed_steps(work)) == summary["step"]      # saved at the stopping step
    _, _, meta = _latest_params(work)
    assert meta["data_step"] == summary["step"]
    assert not (work / "eval.json").exists()


def test_nonfinite_loss_stops_and_keeps_last_good(tmp_path):
    work = tmp_path / "nan"
    # SGD with an absurd lr: the loss of step 1 is finite but its parameters are not (their
    # norm overflows). The old loop checked only loss and gradient norm and checkpointed
    # step 1 as "the last good checkpoint" (issue 20); the loop now checks the parameter norm
    # every step: nothing is saved and the message says there is no healthy checkpoint.
    r = _run(tmp_path, work, 30, lr=1e30, ckpt_every=1)
    assert r.returncode == 3, r.stderr[-3000:]
    msg = [l for l in r.stdout.splitlines() if l.startswith("NONFINITE:")][-1]
    assert "non-finite training loss at step 1 " in msg and "last good checkpoint" in msg, msg
    assert "param_norm=inf" in msg or "param_norm=nan" in msg, msg
    assert "no healthy checkpoint was saved" in msg
    assert _committed_steps(work) == []
    assert not (work / "eval.json").exists()
