"""Peak resident memory and wall time of ``python -m jaxspec.predict`` on a large photo.

For each method, a workdir with *randomly initialised* weights of its preset is written
(:func:`jaxspec.convert.write_workdir`; memory and time do not depend on the weights), a
``--size WxH`` 8-bit PNG is generated, and ``python -m jaxspec.predict`` runs in a fresh
process under the default ``--max-memory`` (4GiB) or ``--max-memory``; the process's peak RSS
(``VmHWM``), its wall time and the chosen tile are printed as JSON lines.

    nice -n 10 python bench/predict_memory.py --methods acc mstpp --preset cpu --size 4000x3000
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

_MAKE = textwrap.dedent("""
    import sys
    from jaxspec import api, convert
    m = api.create_model(sys.argv[1], sys.argv[2])
    convert.write_workdir(sys.argv[3], m.config, m.init(), {"source": "random init (bench)"})
""")
_RUN = textwrap.dedent("""
    import resource, sys
    from jaxspec import predict
    rc = predict.main(sys.argv[1:])
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")]   # reset at exec
    print("PEAK_RSS_BYTES", int(hwm[0].split()[1]) * 1024 if hwm else
          resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    sys.exit(rc)
""")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=["acc", "mstpp"])
    p.add_argument("--preset", default="cpu")
    p.add_argument("--size", default="4000x3000", help="WxH (default 4000x3000)")
    p.add_argument("--max-memory", default=None, help="passed to predict (default: its own)")
    a = p.parse_args(argv)
    w, h = (int(v) for v in a.size.lower().split("x"))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory(prefix="jaxspec_predict_bench_") as tmp:
        tmp = Path(tmp)
        from PIL import Image
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp / "photo.png")
        for method in a.methods:
            wd = tmp / method
            subprocess.run([sys.executable, "-c", _MAKE, method, a.preset, str(wd)], check=True,
                           env=env, capture_output=True)
            cmd = [sys.executable, "-c", _RUN, "--workdir", str(wd), str(tmp / "photo.png"),
                   "--out", str(tmp / f"out_{method}"), "--no-progress"]
            if a.max_memory:
                cmd += ["--max-memory", a.max_memory]
            t0 = time.perf_counter()
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if r.returncode:
                print(json.dumps({"method": method, "error": r.stderr.strip()[-500:]}))
                continue
            peak = int(next(x for x in r.stdout.splitlines()
                            if x.startswith("PEAK_RSS_BYTES")).split()[1])
            side = json.loads((tmp / f"out_{method}" / "photo.json").read_text())
            print(json.dumps({"method": method, "preset": a.preset, "size": f"{w}x{h}",
                              "max_memory": a.max_memory or "4GiB (default)",
                              "peak_rss_gib": round(peak / 2**30, 3), "wall_s": round(wall, 1),
                              "tile": side["tile"], "overlap": side["overlap"],
                              "weights": "random init"}), flush=True)


if __name__ == "__main__":
    main()
