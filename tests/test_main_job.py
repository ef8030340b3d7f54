"""The README's main job, end to end: ``python train.py --method acc`` on the built-in data must
beat the least-squares baseline (fitted on the same training pixels, scored on the same 50
validation images) in MRAE **and** PSNR **and** SAM -- a learned model that loses to a linear
map in any of them is not a result.

Slow (about 6 minutes on 2 CPU cores plus the dataset build on a fresh machine): CI runs it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(args, **kw):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                       text=True, **kw)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.mark.slow
@pytest.mark.parametrize("method", ["acc"])
def test_readme_main_job_beats_least_squares(tmp_path, method):
    work = tmp_path / method
    _run(["train.py", "--method", method, "--workdir", str(work), "--no-progress"],
         timeout=1800)
    ev = json.loads((work / "eval.json").read_text())
    assert ev["num_images"] == 50 and ev["split"] == "validation"
    _run(["bench/baselines.py", "--out", str(tmp_path / "baselines.json")], timeout=600)
    ls = json.loads((tmp_path / "baselines.json").read_text())["results"]["linear"]
    m = ev["mean"]
    assert m["mrae"] < ls["mrae"] and m["psnr"] > ls["psnr"] and m["sam"] < ls["sam"], (m, ls)
    # the run wrote what the README promises
    assert (work / "metrics.jsonl").exists() and any((work / "figures").glob("*.png"))
