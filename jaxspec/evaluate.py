"""Re-evaluate a trained run: ``python -m jaxspec.evaluate --workdir W [--dataset D --split S
--ensemble --tile T --which best|latest --adapt [--adapt-steps K --adapt-lr LR]]``.

Through the method's task (:mod:`jaxspec.tasks`): full images, reflect-padded to the model
stride, the task's metrics per image and averaged over images, on the crop border of the config
(or the dataset's protocol: a ``--dataset`` override takes the new dataset's border unless
``--crop-border`` is given). ``--adapt`` runs the method's per-image test-time adaptation
(settings from the config or the flags; recorded in the JSON). Writes
``<workdir>/eval_<dataset>_<split>[_ens][_adapt].json`` (or ``--out``) and figures.
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
                     figures: int = 2, adapt: bool = False, adapt_steps: int | None = None,
                     adapt_lr: float | None = None) -> dict:
    from jaxspec import api, inference, tasks
    from jaxspec.train import loop, report

    model, variables = api.load(workdir, which=which)
    cfg = model.config
    updates = {}
    if dataset is not None:
        name, _, sub = dataset.partition("/")
        updates.update(dataset=name, dataset_config=sub or None)
        if crop_border is None:
            updates["eval_crop_border"] = None     # the new dataset's own protocol
    if adapt_steps is not None:
        updates["adapt_steps"] = adapt_steps
    if adapt_lr is not None:
        updates["adapt_lr"] = adapt_lr
    if data_dir is not None:
        updates["data_dir"] = data_dir
    if manual_dir is not None:
        updates["manual_dir"] = manual_dir
    if crop_border is not None:
        updates["eval_crop_border"] = crop_border
    cfg = cfg.replace(**updates) if updates else cfg
    split = split or cfg.eval_split
    cfg = cfg.replace(eval_split=split)
    source = loop.load_sources(cfg, [split])[split]    # no 'validation': 'test' (logged)
    split = str(getattr(source, "split", split))
    n_bands, _ = tasks.source_bands(source)
    tasks.resolve_config(cfg, model.method, n_bands, where=f"dataset {loop.dataset_name(cfg)!r}")
    task = model.task
    side = tuple(model.method.side_inputs)
    predict = inference.make_task_predict_fn(task, model.module.apply, variables,
                                             side_inputs=side)
    adapter = None
    if adapt:
        if cfg.adapt_steps < 1:
            raise ValueError("--adapt: the run's config has adapt_steps=0; give --adapt-steps K")
        fn = inference.make_adapter(task, model.module.apply, model.method.adapt_loss,
                                    steps=cfg.adapt_steps, lr=cfg.adapt_lr,
                                    optimizer=cfg.adapt_optimizer,
                                    params=tuple(cfg.adapt_params), side_inputs=side)
        adapter = lambda inputs: fn(variables, inputs)  # noqa: E731
    border = crop_border if crop_border is not None else loop.protocol_crop_border(cfg)
    res = inference.evaluate_dataset(
        predict, loop.eval_batches(cfg, source, method=model.method), crop_border=border,
        stride=model.stride, tile=tile if tile is not None else cfg.eval_tile,
        overlap=overlap if overlap is not None else cfg.eval_tile_overlap,
        ensemble=ensemble, max_images=max_images, keep=figures, task=task,
        scale=task.scale(cfg), side_inputs=side, adapt=adapter)
    tag = (f"{loop.dataset_name(cfg).replace('/', '-')}_{split}" + ("_ens" if ensemble else "")
           + ("_adapt" if adapt else ""))
    out = Path(out) if out is not None else Path(workdir) / f"eval_{tag}.json"
    report.write_eval_json(out, res, method=cfg.method, dataset=loop.dataset_name(cfg),
                           split=split, checkpoint=which, task=task.name,
                           adapt=loop.adapt_settings(cfg) if adapt else None)
    if figures and res["examples"]:
        report.save_figures(out.parent / f"figures_{tag}", res["examples"])
    res["path"] = str(out)
    res["dataset"], res["split"] = loop.dataset_name(cfg), split
    return res


def main(argv=None) -> int:
    from jaxspec.errors import run_cli
    return run_cli(_main, argv, prog="jaxspec.evaluate")


def _main(argv=None) -> int:
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
    p.add_argument("--adapt", action="store_true",
                   help="per-image test-time adaptation (the method's adapt_loss)")
    p.add_argument("--adapt-steps", type=int, default=None, help="default: config.adapt_steps")
    p.add_argument("--adapt-lr", type=float, default=None, help="default: config.adapt_lr")
    a = p.parse_args(argv)
    from jaxspec.errors import UsageError
    from jaxspec.train.workdir import check_output_writable
    if a.tile is not None and a.tile < 1:
        raise UsageError(f"--tile must be a positive number of pixels, got {a.tile}")
    if a.overlap is not None and (a.overlap < 0 or (a.tile and a.overlap >= a.tile)):
        raise UsageError(f"--overlap must be in [0, --tile), got {a.overlap}")
    check_output_writable(Path(a.out).absolute().parent if a.out else a.workdir,
                          what="evaluation output directory")
    res = evaluate_workdir(a.workdir, dataset=a.dataset, split=a.split, data_dir=a.data_dir,
                           manual_dir=a.manual_dir, ensemble=a.ensemble, tile=a.tile,
                           overlap=a.overlap, crop_border=a.crop_border, which=a.which,
                           max_images=a.max_images, out=a.out, figures=a.figures,
                           adapt=a.adapt, adapt_steps=a.adapt_steps, adapt_lr=a.adapt_lr)
    print(json.dumps({"dataset": res["dataset"], "split": res["split"],
                      "images": res["num_images"], "mean": res["mean"], "path": res["path"]},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
