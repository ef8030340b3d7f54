"""Re-evaluate a trained run: ``python -m jaxspec.evaluate --workdir W [--dataset D --split S
--ensemble --tile T --which best|latest]``.

Full images, reflect-padded to the model stride, metrics of ``jaxspec.metrics.evaluate_all`` per
image and averaged over images, on the crop border of the config (or the dataset's protocol).
Writes ``<workdir>/eval_<dataset>_<split>[_ens].json`` (or ``--out``) and figures.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def evaluate_workdir(workdir: str | os.PathLike, *, dataset: str | None = None,
                     split: str | None = None, data_dir: str | None = None,
                     manual_dir: str | None = None, ensemble: bool = False,
                     tile: int | None = None, overlap: int | None = None,
                     crop_border: int | None = None, which: str = "best",
                     max_images: int | None = None, out: str | os.PathLike | None = None,
                     figures: int = 2) -> dict:
    from jaxspec import api, inference
    from jaxspec.train import loop, report

    model, variables = api.load(workdir, which=which)
    cfg = model.config
    updates = {}
    if dataset is not None:
        name, _, sub = dataset.partition("/")
        updates.update(dataset=name, dataset_config=sub or None)
    if data_dir is not None:
        updates["data_dir"] = data_dir
    if manual_dir is not None:
        updates["manual_dir"] = manual_dir
    if crop_border is not None:
        updates["eval_crop_border"] = crop_border
    cfg = cfg.replace(**updates) if updates else cfg
    split = split or cfg.eval_split
    source = loop.load_sources(cfg, [split])[split]
    predict = inference.make_predict_fn(model.module.apply, variables)
    border = crop_border if crop_border is not None else loop.protocol_crop_border(cfg)
    res = inference.evaluate_dataset(
        predict, loop.eval_batches(cfg, source), crop_border=border, stride=model.stride,
        tile=tile if tile is not None else cfg.eval_tile,
        overlap=overlap if overlap is not None else cfg.eval_tile_overlap,
        ensemble=ensemble, max_images=max_images, keep=figures)
    tag = f"{loop.dataset_name(cfg).replace('/', '-')}_{split}" + ("_ens" if ensemble else "")
    out = Path(out) if out is not None else Path(workdir) / f"eval_{tag}.json"
    report.write_eval_json(out, res, method=cfg.method, dataset=loop.dataset_name(cfg),
                           split=split, checkpoint=which)
    if figures and res["examples"]:
        report.save_figures(out.parent / f"figures_{tag}", res["examples"])
    res["path"] = str(out)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxspec.evaluate", description=__doc__)
    p.add_argument("--workdir", required=True)
    p.add_argument("--dataset", default=None, help="default: the run's dataset")
    p.add_argument("--split", default=None, help="default: the run's eval split")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--manual-dir", default=None)
    p.add_argument("--ensemble", action="store_true", help="x8 flip/transpose self-ensemble")
    p.add_argument("--tile", type=int, default=None)
    p.add_argument("--overlap", type=int, default=None)
    p.add_argument("--crop-border", type=int, default=None)
    p.add_argument("--which", choices=("best", "latest"), default="best")
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--out", default=None, help="eval JSON path")
    p.add_argument("--figures", type=int, default=2, help="number of example figures")
    a = p.parse_args(argv)
    try:
        res = evaluate_workdir(a.workdir, dataset=a.dataset, split=a.split, data_dir=a.data_dir,
                               manual_dir=a.manual_dir, ensemble=a.ensemble, tile=a.tile,
                               overlap=a.overlap, crop_border=a.crop_border, which=a.which,
                               max_images=a.max_images, out=a.out, figures=a.figures)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"images": res["num_images"], "mean": res["mean"], "path": res["path"]},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
