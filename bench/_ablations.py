"""What the ablation benches (``bench/ccnet_ablations.py``, ``bench/mcga_ablations.py``) share:
training one variant with reuse of a finished run of the same config, and the column saying
whether the direction of an effect agrees with the paper's."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def direction(ours: dict, ref: dict, paper: float | None, paper_ref: float | None,
              tol: float) -> str:
    """Does our (MRAE, PSNR) move from ``ref`` to ``ours`` the way the paper's MRAE moves from
    ``paper_ref`` to ``paper``? 'yes' / 'no' / 'partly (...)' / 'tie' (our relative MRAE change
    below ``tol``) / 'n/a' (row not in the paper); a paper change of zero is reported as such."""
    if paper is None or paper_ref is None:
        return "n/a (not in paper)"
    d_mrae = (ours["mrae"] - ref["mrae"]) / ref["mrae"]
    if abs(d_mrae) < tol:
        return "tie" + (" (paper: no change)" if paper == paper_ref else "")
    ours_worse_mrae, ours_worse_psnr = d_mrae > 0, ours["psnr"] < ref["psnr"]
    if paper == paper_ref:
        return "paper: no change; ours " + ("worse" if ours_worse_mrae else "better")
    p_worse = paper > paper_ref
    if ours_worse_mrae == p_worse and ours_worse_psnr == p_worse:
        return "yes"
    if ours_worse_mrae == p_worse or ours_worse_psnr == p_worse:
        return "partly (MRAE " + ("yes" if ours_worse_mrae == p_worse else "no") + \
               ", PSNR " + ("yes" if ours_worse_psnr == p_worse else "no") + ")"
    return "no"


def add_common_args(p, *, crop: int, eval_images: int) -> None:
    """The budget and selection options both ablation benches take."""
    p.add_argument("--crop", type=int, default=crop)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=None, help="default: the cpu preset's")
    p.add_argument("--eval-images", type=int, default=eval_images)
    p.add_argument("--only", default=None, help="comma-separated subset of variants")
    p.add_argument("--tolerance", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)


def load_results(res_file: Path) -> dict:
    return json.loads(res_file.read_text()).get("results", {}) if res_file.exists() else {}


def train_variant(name: str, cfg, workdir: Path, results: dict, res_file: Path, args: dict,
                  depends: str = "", **train_kwargs) -> dict:
    """Train ``cfg`` in ``workdir`` (resuming it) unless ``results[name]`` holds a finished
    run of the same config (and the same ``depends``, e.g. the key of the run it starts from);
    record eval metrics, params, wall time and steps/s in ``results`` and rewrite ``res_file``
    (``{"args": args, "results": results}``) after every variant."""
    from jaxspec.train import train_and_evaluate
    key = json.dumps(cfg.to_dict(), sort_keys=True) + depends
    if name in results and results[name].get("config_key") == key:
        print(f"{name}: reusing {workdir}", file=sys.stderr)
        return results[name]
    t = time.perf_counter()
    summary = train_and_evaluate(cfg, workdir, resume=True, progress=False, figures=0,
                                 **train_kwargs)
    wall = time.perf_counter() - t
    if summary.get("preempted"):
        raise SystemExit(f"{name}: interrupted; run the same command again to resume")
    metrics = [json.loads(line) for line in
               (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    sps = [m["steps_per_sec"] for m in metrics if "steps_per_sec" in m]
    results[name] = {"eval": summary["eval"], "params": summary["params"], "wall_s": wall,
                     "steps_per_sec": sps[-1] if sps else None, "config_key": key}
    res_file.write_text(json.dumps({"args": args, "results": results}, indent=2))
    print(f"{name}: {json.dumps(summary['eval'])} ({wall:.0f} s)", file=sys.stderr, flush=True)
    return results[name]


def decay_table(rows: dict, dists, far: int = 16) -> list[str]:
    """Markdown rows of mean ``||J_ij||_2`` over the pairs with ``|i - j| = d`` for each ``d``
    of ``dists`` (square C x C norm matrices in ``rows``) and the largest one at ``d >= far``."""
    import numpy as np
    lines = ["| module | " + " | ".join(f"d={d}" for d in dists) + f" | max at d>={far} |",
             "|" + "---|" * (len(dists) + 2)]
    for name, norms in rows.items():
        i, j = np.indices(norms.shape)
        vals = [norms[np.abs(i - j) == d].mean() for d in dists]
        top = norms[np.abs(i - j) >= far].max()
        lines.append(f"| {name} | " + " | ".join(f"{v:.3g}" for v in vals) + f" | {top:.3g} |")
    return lines
