"""Fault injection: corrupt / truncated / deleted checkpoint files, a real run resumed past a
corrupt latest checkpoint (final parameters equal an uninterrupted run), best/latest of two
runs, divergence with exploding parameters in a real run, a full disk (small tmpfs, root only),
lock contention between two real processes.

Every injected fault is counted; a fault is *survived* when the code under test reports it as
documented (one line, typed error or fallback) and no state is lost. The totals are printed
(``pytest -s``) and written to ``$JAXSPEC_FAULT_REPORT`` (JSON) when set; docs/reliability.md
quotes them. Rerun: ``JAXSPEC_FAULT_REPORT=/tmp/faults.json python -m pytest -q -s
tests/test_faults.py``.
"""
from __future__ import annotations

import collections
import contextlib
import errno
import json
import logging
import os
import shutil
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

sys.path.insert(0, str(Path(__file__).parent))
import test_checkpoint as TC  # noqa: E402  (the tiny training script and its helpers)

from jaxspec import errors  # noqa: E402
from jaxspec.errors import CheckpointError, DivergenceError, OutputError  # noqa: E402
from jaxspec.train import checkpointing as C  # noqa: E402
from jaxspec.train.workdir import check_output_writable, write_json_atomic  # noqa: E402

REPO = TC.REPO
FAULTS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    tot = collections.Counter()
    for c in FAULTS.values():
        tot.update(c)
    lines = [f"{k}: injected {c['injected']}, survived {c['survived']}"
             for k, c in sorted(FAULTS.items())]
    lines.append(f"TOTAL: faults injected {tot['injected']}, survived {tot['survived']}")
    print("\n" + "\n".join(lines))
    out = os.environ.get("JAXSPEC_FAULT_REPORT")
    if out:
        Path(out).write_text(json.dumps({k: dict(c) for k, c in FAULTS.items()}, indent=1))


def _tree(s: float):
    return {"step": jnp.asarray(int(s), jnp.int32),
            "params": {"w": jnp.full((4, 8), s, jnp.float32), "b": jnp.arange(16.0) + s},
            "opt_state": ({"mu": jnp.ones(3) * s},), "batch_stats": {},
            "rng": jax.random.PRNGKey(0)}


def _three_steps(root: Path) -> Path:
    ck = C.Checkpointer(root / "checkpoints", keep_last=3)
    for s in (1, 2, 3):
        ck.save(s, _tree(s), {"data_step": s, "run_id": "run-a"})
    ck.wait()
    ck.close()
    return root / "checkpoints"


_STEP_FILES = ("state/d", "state/manifest.ocdbt", "state/_METADATA", "meta/metadata",
               "state/array_metadatas/process_0")


def _corrupt(step_dir: Path, rel: str, how: str) -> str:
    """Truncate (to half) or delete ``rel`` below ``step_dir`` (for ``state/d``: its largest
    data file); returns the file's path relative to the step dir."""
    p = step_dir / rel
    if p.is_dir():
        p = max((f for f in p.iterdir() if f.is_file()), key=lambda f: f.stat().st_size)
    if how == "delete":
        p.unlink()
    else:
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])
    return str(p.relative_to(step_dir))


# (deleting state/array_metadatas/* is harmless: orbax restores without it)
_FAULTS = [(rel, how) for rel in _STEP_FILES for how in ("truncate", "delete")
           if (rel, how) != ("state/array_metadatas/process_0", "delete")]


@pytest.mark.parametrize("rel,how", _FAULTS)
def test_corrupt_latest_falls_back_in_one_line(tmp_path, caplog, rel, how):
    d = _three_steps(tmp_path)
    FAULTS["checkpoint file " + how]["injected"] += 1
    name = _corrupt(d / "latest" / "3", rel, how)
    with caplog.at_level(logging.WARNING, logger="jaxspec.checkpoint"):
        with C.Checkpointer(d) as ck:
            tree, meta = ck.restore(_tree(0))
            assert ck.restored_step == 2 and meta["data_step"] == 2
            np.testing.assert_array_equal(tree["params"]["w"], np.full((4, 8), 2.0))
            # the corrupt step is set aside, so the resumed run can save step 3 again
            assert ck.all_steps() == [1, 2]
            assert any(p.name.startswith("latest-3-") for p in (d / "corrupt").iterdir())
    lines = [r.getMessage() for r in caplog.records if r.name == "jaxspec.checkpoint"]
    assert len(lines) == 1, lines
    assert "latest/3" in lines[0] and name.split("/")[-1] in lines[0] and "step 2" in lines[0]
    assert "\n" not in lines[0]
    FAULTS["checkpoint file " + how]["survived"] += 1


def test_explicit_corrupt_step_is_a_checkpoint_error(tmp_path):
    d = _three_steps(tmp_path)
    FAULTS["checkpoint file truncate"]["injected"] += 1
    _corrupt(d / "latest" / "2", "state/d", "truncate")
    with C.Checkpointer(d, read_only=True) as ck:
        with pytest.raises(CheckpointError, match=r"latest/2 .*file state/d/") as e:
            ck.restore(_tree(0), step=2)
        assert "\n" not in str(e.value)
        assert errors.classify(e.value)[0] == errors.EXIT_CHECKPOINT
        # restore_variables (evaluate/predict) also skips it; read-only: nothing is moved
        variables, meta = ck.restore_variables(which="latest", step=None)
        assert meta["data_step"] == 3
    FAULTS["checkpoint file truncate"]["survived"] += 1


def test_all_steps_corrupt_names_every_step(tmp_path):
    d = _three_steps(tmp_path)
    for s in (1, 2, 3):
        FAULTS["checkpoint file delete"]["injected"] += 1
        _corrupt(d / "latest" / str(s), "meta/metadata", "delete")
    with C.Checkpointer(d, read_only=True) as ck:
        with pytest.raises(CheckpointError) as e:
            ck.restore(_tree(0))
    msg = str(e.value)
    assert all(f"latest/{s}" in msg for s in (1, 2, 3)) and "meta/metadata is missing" in msg
    FAULTS["checkpoint file delete"]["survived"] += 3


def test_corrupt_best_falls_back_to_latest(tmp_path):
    d = _three_steps(tmp_path)
    with C.Checkpointer(d) as ck:
        ck.save_best(2, {"params": _tree(7)["params"], "batch_stats": {}}, {"mrae": 0.1},
                     {"run_id": "run-a"})
        ck.wait()
    FAULTS["checkpoint file truncate"]["injected"] += 1
    _corrupt(d / "best" / "2", "state/d", "truncate")
    with C.Checkpointer(d, read_only=True) as ck:
        variables, meta = ck.restore_variables()
    np.testing.assert_array_equal(variables["params"]["w"], np.full((4, 8), 3.0))
    FAULTS["checkpoint file truncate"]["survived"] += 1


def test_best_of_another_run_is_moved_aside(tmp_path):
    """best/ and latest/ describe one run: a best/ step of another run (the interleaved-runs
    failure of issue 20) is moved to checkpoints/orphaned/."""
    d = _three_steps(tmp_path)          # latest/ of run-a
    FAULTS["best/latest of two runs"]["injected"] += 1
    with C.Checkpointer(d) as ck:       # run-b's best checkpoint left in the same workdir
        ck.save_best(50, {"params": _tree(9)["params"], "batch_stats": {}}, {"mrae": 0.1},
                     {"run_id": "run-b"})
        ck.wait()
    with C.Checkpointer(d, read_only=True) as ck:
        assert ck.best_step() == 50
        with pytest.raises(CheckpointError, match="mixes two runs"):
            ck.reconcile()
    with C.Checkpointer(d) as ck:
        assert ck.run_id() == "run-a"
        assert ck.reconcile() == [50] and ck.best_step() is None
        assert ck.reconcile() == []
        variables, _ = ck.restore_variables()      # no best of this run: its latest
        np.testing.assert_array_equal(variables["params"]["w"], np.full((4, 8), 3.0))
    assert (d / "orphaned" / "best-50-run-b").is_dir()
    FAULTS["best/latest of two runs"]["survived"] += 1


# ------------------------------------------------------------------------- real runs
def test_real_run_resumes_past_corrupt_latest_and_matches_uninterrupted(tmp_path):
    """The current loop's resume (train_and_evaluate -> Checkpointer.restore) skips a
    truncated latest checkpoint, restarts from the previous one and ends with the same
    parameters as an uninterrupted run."""
    steps = 9
    ref = TC._summary(TC._run(tmp_path, tmp_path / "ref", steps))
    assert ref["step"] == steps and TC._committed_steps(tmp_path / "ref") == [6, 9]
    work = tmp_path / "work"
    shutil.copytree(tmp_path / "ref", work)
    # as if killed after saving step 9, before the final evaluation wrote best/9 and eval.json
    shutil.rmtree(work / "checkpoints" / "best" / "9")
    (work / "eval.json").unlink()
    FAULTS["real run: corrupt latest checkpoint"]["injected"] += 1
    _corrupt(work / "checkpoints" / "latest" / "9", "state/d", "truncate")
    r = TC._run(tmp_path, work, steps)
    resumed = TC._summary(r)
    assert resumed["start_step"] == 6 and resumed["step"] == steps
    warn = [l for l in r.stderr.splitlines() if "corrupt checkpoint latest/9" in l]
    assert len(warn) == 1 and "state/d/" in warn[0] and "step 6" in warn[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "Event loop is closed" not in r.stderr
    _, p_ref, _ = TC._latest_params(tmp_path / "ref")
    s_res, p_res, _ = TC._latest_params(work)
    assert s_res == steps
    for a, b in zip(jax.tree.leaves(p_ref), jax.tree.leaves(p_res)):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
    FAULTS["real run: corrupt latest checkpoint"]["survived"] += 1


# The tiny run of test_checkpoint through the real loop (its HealthMonitor at every checkpoint
# boundary), with a warm-up read from the environment.
_DIVERGING = TC._TRAIN_SCRIPT.replace(
    "keep_last=2,", "keep_last=2, warmup_steps=int(os.environ.get('WARMUP', '0')),").replace(
    "import json, sys, time", "import json, os, sys, time")


def test_real_divergence_keeps_last_healthy_checkpoint(tmp_path):
    """SGD with lr 2000 after a 4-step warm-up: the loss stays finite (the network dies) but
    the parameter norm jumps ~1e4x. The old loop checked only loss and gradient norm and kept
    checkpointing exploded parameters; the loop's HealthMonitor stops the run at the first
    exploding checkpoint boundary, saves nothing of it and names the last healthy checkpoint."""
    script = tmp_path / "diverging.py"
    script.write_text(_DIVERGING)
    work = tmp_path / "div"
    FAULTS["real run: exploding parameters"]["injected"] += 1
    r = subprocess.run([sys.executable, str(script), str(work), "12", "0", "2000", "1"],
                       cwd=REPO, env=dict(TC._env(), WARMUP="4"), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 3, r.stderr[-3000:]
    msg = [l for l in r.stdout.splitlines() if l.startswith("NONFINITE:")][-1]
    # the loop logs every step (log_every=1), param_norm included, before the boundary check
    norms = {rec["step"]: rec["param_norm"] for rec in map(
        json.loads, (work / "metrics.jsonl").read_text().splitlines()) if "param_norm" in rec}
    bad = max(norms)
    good = max(s for s in norms if s < bad)
    assert norms[bad] > 10 * norms[good]
    assert f"training diverged at step {bad}" in msg and f"checkpoint is step {good}" in msg
    assert TC._committed_steps(work)[-1] == good       # the exploded state was not saved
    with C.Checkpointer(work / "checkpoints", read_only=True) as ck:
        assert ck.last_healthy_step() == good
        assert ck.read_meta(step=good)["param_norm"] == pytest.approx(norms[good], rel=1e-4)
        variables, _ = ck.restore_variables(which="latest")
        assert C.param_norm(variables["params"]) == pytest.approx(norms[good], rel=1e-4)
    FAULTS["real run: exploding parameters"]["survived"] += 1


def test_params_healthy_semantics():
    assert C.params_healthy(None, 5.0) and C.params_healthy(71.0, 700.0)
    assert not C.params_healthy(71.0, 4.7e7) and not C.params_healthy(71.0, 1.0)
    assert not C.params_healthy(None, float("nan")) and not C.params_healthy(1.0, float("inf"))
    assert C.params_healthy(float("nan"), 3.0)          # no usable reference: finite is enough
    with pytest.raises(ValueError):
        C.params_healthy(1.0, 1.0, factor=1.0)
    mon = C.HealthMonitor(71.0, step=0)
    mon.check(1, 80.0)
    mon.saved(1, 80.0)
    with pytest.raises(DivergenceError, match="step 2: parameter norm 4.7e\\+07 .* last "
                                              "healthy checkpoint is step 1"):
        mon.check(2, 4.7e7)
    with pytest.raises(DivergenceError, match="non-finite loss"):
        mon.check(2, 80.0, loss=float("nan"))
    assert errors.classify(DivergenceError("x"))[0] == errors.EXIT_DIVERGED


# ------------------------------------------------------------------------- disk full
@contextlib.contextmanager
def _tmpfs(path: Path, size: str = "1m"):
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_disk_full(tmp_path):
    with _tmpfs(tmp_path / "small") as d:
        (d / "filler").write_bytes(b"\0" * (1024 * 1024 - 64 * 1024))    # leave ~64 KiB
        FAULTS["disk full"]["injected"] += 3
        # 1. atomic JSON: the old file survives, no temp file is left, typed error
        write_json_atomic(d / "config.json", {"ok": 1})
        with pytest.raises(OutputError, match="config.json.*No space left on device"):
            write_json_atomic(d / "config.json", {"big": "x" * 200_000})
        assert json.loads((d / "config.json").read_text()) == {"ok": 1}
        assert [p.name for p in d.iterdir() if p.name.endswith(".tmp")] == []
        FAULTS["disk full"]["survived"] += 1
        # 2. the output probe refuses before any work when free space is below the need
        with pytest.raises(OutputError, match="MiB free"):
            check_output_writable(d, min_free_bytes=10 * 2**20)
        FAULTS["disk full"]["survived"] += 1
        # 3. a checkpoint save into the full disk: one line, exit code 6
        r = _run_cli_subprocess(main_src=textwrap.dedent(f"""
            import jax
            from jaxspec.train import checkpointing as C
            def main():
                with C.Checkpointer({str(d / 'checkpoints')!r}, async_save=False) as ck:
                    w = jax.random.normal(jax.random.PRNGKey(0), (256, 256))   # incompressible
                    ck.save(1, {{"params": {{"w": w}}}}, {{}})
                    ck.wait()
        """))
        assert r.returncode == errors.EXIT_OUTPUT, r.stderr[-3000:]
        err_lines = [l for l in r.stderr.splitlines() if l.startswith("jaxspec: error:")]
        assert len(err_lines) == 1 and "No space left on device" in err_lines[0]
        assert "Traceback" not in r.stderr
        FAULTS["disk full"]["survived"] += 1


def _run_cli_subprocess(main_src: str, env: dict | None = None):
    code = main_src + "\nimport sys\nfrom jaxspec.errors import run_cli\nsys.exit(run_cli(main))\n"
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, env=dict(TC._env(), **(env or {})), timeout=300)


# ------------------------------------------------------------------------- lock contention
_HOLD = textwrap.dedent("""
    import sys, time
    from jaxspec.errors import run_cli
    from jaxspec.train.workdir import WorkdirLock
    def main():
        with WorkdirLock(sys.argv[1]):
            print("LOCKED", flush=True)
            time.sleep(float(sys.argv[2]))
            print("DONE", flush=True)
    sys.exit(run_cli(main))
""")


def _hold(workdir: Path, seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _HOLD, str(workdir), str(seconds)],
                            cwd=REPO, env=TC._env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_locked(proc: subprocess.Popen) -> None:
    line = proc.stdout.readline()
    assert line.strip() == "LOCKED", proc.stderr.read()


def test_lock_contention_between_real_processes(tmp_path):
    work = tmp_path / "w"
    a = _hold(work, 60)
    try:
        _wait_locked(a)
        FAULTS["workdir lock contention"]["injected"] += 1
        b = _hold(work, 0)
        out, err = b.communicate(timeout=60)
        assert b.returncode == errors.EXIT_WORKDIR, err
        lines = [l for l in err.splitlines() if l.strip()]
        assert len(lines) == 1 and lines[0].startswith("jaxspec: error: workdir")
        assert f"pid {a.pid}" in lines[0] and "since" in lines[0] and "command:" in lines[0]
        FAULTS["workdir lock contention"]["survived"] += 1
        # the holder dies without cleanup (SIGKILL): the kernel frees the lock, the next run
        # takes it over and says whose stale record it replaced
        FAULTS["workdir lock holder killed"]["injected"] += 1
        a.send_signal(signal.SIGKILL)
        a.wait(timeout=30)
        c = _hold(work, 0)
        out, err = c.communicate(timeout=60)
        assert c.returncode == 0 and "LOCKED" in out and "DONE" in out, err
        assert f"taking over the lock of pid {a.pid}" in err
        assert (work / ".lock").read_text() == ""          # clean release: no record left
        FAULTS["workdir lock holder killed"]["survived"] += 1
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()


def test_mismatched_target_is_not_mistaken_for_corruption(tmp_path):
    """A restore into another architecture fails in one line and moves nothing aside."""
    d = _three_steps(tmp_path)
    other = _tree(0)
    other["params"]["w"] = jnp.zeros((5, 8), jnp.float32)
    with C.Checkpointer(d) as ck:
        with pytest.raises(CheckpointError, match="latest/3 .*cannot be restored into the "
                                                  "current model"):
            ck.restore(other)
        assert ck.all_steps() == [1, 2, 3]
    assert not (d / "corrupt").exists()
