"""Re-evaluate a trained run: ``python -m jaxspec.evaluate --workdir W [--dataset D --split S
--ensemble --tile T --which best|latest --adapt|--tta [--adapt-steps K --adapt-lr LR]
--perturb NAME [--perturb-seed N] --consistent]``.

Through the method's task (:mod:`jaxspec.tasks`): full images, reflect-padded to the model
stride, the task's metrics per image and averaged over images, on the crop border of the config
(or the dataset's protocol: a ``--dataset`` override takes the new dataset's border unless
``--crop-border`` is given). ``--adapt`` (alias ``--tta``) runs the method's per-image
test-time adaptation (settings from the config or the flags; recorded in the JSON).
``--perturb NAME`` applies a robustness protocol of :mod:`jaxspec.robustness` (brightness+10,
brightness-10, mixed, noise, jpeg, srf:NAME; docs/robustness.md) to every image before
prediction, recorded in the JSON. ``--consistent`` projects every predicted spectrum onto the
spectra that reproduce its input RGB through the data's SRF (:func:`consistency_srf`,
:func:`jaxspec.physics.make_consistent`; linear RGB only). Writes
``<workdir>/eval_<dataset>_<split>[_ens][_<perturb>][_adapt][_consistent].json`` (or ``--out``)
and figures.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from jaxspec.errors import UsageError


@dataclasses.dataclass
class Prepared:
    """A loaded run ready to evaluate (:func:`prepare`): model, variables, resolved config,
    evaluation source, task, predict function and (built on first use) the adapter, so one
    process can score several protocols without reloading or recompiling."""
    workdir: Path
    which: str
    model: Any
    variables: Any
    cfg: Any
    source: Any
    split: str
    crop_border: int | None
    predict: Any
    _adapter: Any = None

    def adapter(self):
        """``inputs -> adapted variables`` (:func:`jaxspec.inference.make_adapter` with the
        config's adapt settings), built once."""
        if self._adapter is None:
            from jaxspec import inference
            from jaxspec.train import loop
            cfg, model = self.cfg, self.model
            if cfg.adapt_steps < 1:
                raise UsageError("--adapt/--tta: the run's config has adapt_steps=0; give "
                                 "--adapt-steps K")
            if model.method.adapt_loss is None:
                raise UsageError(f"--adapt/--tta: method {model.method.name!r} defines no "
                                 f"test-time adaptation loss (Method.adapt_loss)")
            fn = inference.make_adapter(model.task, model.module.apply, model.method.adapt_loss,
                                        side_inputs=tuple(model.method.side_inputs),
                                        **loop.adapter_options(cfg))
            variables = self.variables
            self._adapter = lambda inputs: fn(variables, inputs)  # noqa: E731
        return self._adapter


def prepare(workdir: str | os.PathLike, *, dataset: str | None = None, split: str | None = None,
            data_dir: str | None = None, manual_dir: str | None = None,
            crop_border: int | None = None, which: str = "best",
            adapt_steps: int | None = None, adapt_lr: float | None = None) -> Prepared:
    """Load the run in ``workdir`` and its evaluation data (see :func:`evaluate_workdir`)."""
    from jaxspec import api, inference, tasks
    from jaxspec.train import loop

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
    predict = inference.make_task_predict_fn(model.task, model.module.apply, variables,
                                             side_inputs=tuple(model.method.side_inputs))
    return Prepared(Path(workdir), which, model, variables, cfg, source, split, crop_border,
                    predict)


def training_srf(run: Prepared) -> tuple[np.ndarray | None, str]:
    """(C, 3) SRF the run's training RGB was rendered with and where it came from:
    ``input.json`` ``srf``, else the evaluation data's own ``srf`` feature, else None."""
    from jaxspec.predict import model_input_spec
    spec = model_input_spec(run.workdir)
    if "srf" in spec:
        return np.asarray(spec["srf"], np.float32), "input.json"
    try:
        ex = run.source[0]
    except Exception:  # noqa: BLE001 - sources without random access
        return None, "none"
    if "srf" in ex:
        return np.asarray(ex["srf"], np.float32), "dataset srf feature"
    return None, "none"


def consistency_srf(run: Prepared) -> tuple[np.ndarray, str]:
    """(C, 3) SRF through which ``--consistent`` makes predictions reproduce their input RGB,
    and where it came from: the evaluation data's ``srf`` feature (example 0; the builders
    render every image of a dataset through one SRF), else the run's ``input.json``. Raises
    :class:`UsageError` when the model's input is not that linear RGB: another task, a
    per-image normalisation (``rgb_norm`` other than ``"none"``) or non-linear encoding."""
    from jaxspec.predict import check_consistent_input, model_input_spec
    check_consistent_input(run.model, model_input_spec(run.workdir))
    try:
        ex = run.source[0]
    except Exception:  # noqa: BLE001 - sources without random access
        ex = {}
    if "srf" in ex:
        return np.asarray(ex["srf"], np.float32), "evaluation data srf feature"
    srf, where = training_srf(run)
    if srf is None:
        raise UsageError("--consistent: neither the evaluation data nor the run's input.json "
                         "records the SRF the RGB was rendered with")
    return srf, where


def _perturbed_batches(run: Prepared, p, seed: int):
    """The evaluation batches with ``p`` applied to the raw (un-normalised) examples, then the
    run's ``rgb_norm`` (what the loader does without a perturbation)."""
    from jaxspec import api, robustness
    from jaxspec.data.pipeline import normalize_rgb
    from jaxspec.predict import model_input_spec
    from jaxspec.train import loop
    if run.model.task.name != "rgb2hsi":
        raise UsageError(f"--perturb: the robustness protocols perturb the RGB input of rgb2hsi "
                         f"methods; {run.model.method.name!r} is a {run.model.task.name} method")
    full_scale = float(model_input_spec(run.workdir).get("native_scale", 1.0))
    srf = None
    if p.kind == "srf":
        train_srf, _ = training_srf(run)
        if train_srf is None:
            raise UsageError(f"--perturb {p.name}: the run records no training SRF (input.json "
                             f"has no 'srf') and its data has no 'srf' feature, so its RGB is "
                             f"not known to be a rendering of the HSI")
        n_bands = int(train_srf.shape[0])
        from jaxspec import physics
        srf = physics.get_srf(p.srf, api.bands_of(run.model, n_bands, run.workdir))
    raw = loop.eval_batches(run.cfg.replace(rgb_norm="none"), run.source,
                            method=run.model.method)
    if srf is not None:
        raw = _checked_rendering(raw, train_srf, full_scale, p.name)
    elif p.kind in ("brightness", "noise", "jpeg"):
        raw = _checked_scale(raw, full_scale, p.name)
    for batch in robustness.perturb_batches(raw, p, seed, full_scale=full_scale, srf=srf):
        batch["rgb"] = normalize_rgb(batch["rgb"], run.cfg.rgb_norm)
        yield batch


def _checked_scale(batches, full_scale, name):
    """``batches`` unchanged, after checking that the RGB lies in the run's full scale
    (``input.json`` ``native_scale``; 99th percentile <= it): the protocols that work on
    ``x / s`` (gamma, photo-electrons, 8-bit codes) would otherwise be meaningless."""
    for batch in batches:
        p99 = float(np.percentile(np.asarray(batch["rgb"], np.float32), 99))
        if p99 > full_scale:
            raise UsageError(f"--perturb {name}: the RGB's 99th percentile {p99:.4g} exceeds "
                             f"the run's full scale {full_scale:g} (input.json native_scale)")
        yield batch


def _checked_rendering(batches, train_srf, full_scale, name, tol: float = 1e-3):
    """``batches`` unchanged, after checking that each image's RGB is its HSI projected through
    the training SRF (relative RMS error <= ``tol``): a re-rendering through another SRF is only
    a change of camera when the training RGB was made that way."""
    from jaxspec import robustness
    for batch in batches:
        want = robustness.rerender(batch["hsi"], train_srf, full_scale)
        rgb = np.asarray(batch["rgb"], np.float32)
        err = float(np.sqrt(np.mean((want - rgb) ** 2)) / max(np.sqrt(np.mean(rgb ** 2)), 1e-12))
        if err > tol:
            raise UsageError(f"--perturb {name}: this run's RGB is not its HSI projected through "
                             f"the training SRF (relative RMS error {err:.3g} > {tol}); "
                             f"re-rendering would change more than the camera")
        yield batch


def evaluate_workdir(workdir: str | os.PathLike, *, dataset: str | None = None,
                     split: str | None = None, data_dir: str | None = None,
                     manual_dir: str | None = None, ensemble: bool = False,
                     tile: int | None = None, overlap: int | None = None,
                     crop_border: int | None = None, which: str = "best",
                     max_images: int | None = None, out: str | os.PathLike | None = None,
                     figures: int = 2, adapt: bool = False, adapt_steps: int | None = None,
                     adapt_lr: float | None = None, perturb: str | None = None,
                     perturb_seed: int = 0, prepared: Prepared | None = None,
                     consistent: bool = False) -> dict:
    """Evaluate the run in ``workdir`` (see the module docstring). ``perturb``: a robustness
    protocol of :mod:`jaxspec.robustness` applied to every image (seed ``perturb_seed``).
    ``consistent``: predictions made to reproduce their input RGB (:func:`consistency_srf`).
    ``prepared`` (from :func:`prepare`) reuses a loaded run; its data options then win over
    the ones given here."""
    from jaxspec import inference, robustness
    from jaxspec.train import loop, report

    p = robustness.parse(perturb) if perturb is not None else None
    run = prepared if prepared is not None else prepare(
        workdir, dataset=dataset, split=split, data_dir=data_dir, manual_dir=manual_dir,
        crop_border=crop_border, which=which, adapt_steps=adapt_steps, adapt_lr=adapt_lr)
    cfg, model, task, split = run.cfg, run.model, run.model.task, run.split
    side = tuple(model.method.side_inputs)
    adapter = run.adapter() if adapt else None
    predict, info = run.predict, {}
    if consistent:
        if p is not None:
            raise UsageError("--consistent with --perturb: the perturbed RGB is no longer the "
                             "projection of the spectra through the data's SRF")
        from jaxspec import physics
        srf, where = consistency_srf(run)
        info["consistent"] = {"srf_from": where}

        def predict(inputs, *v, _base=run.predict, _srf=srf):
            return physics.make_consistent(_base(inputs, *v), inputs["rgb"], _srf)
    border = (run.crop_border if run.crop_border is not None
              else loop.protocol_crop_border(cfg))
    batches = (_perturbed_batches(run, p, perturb_seed) if p is not None
               else loop.eval_batches(cfg, run.source, method=model.method))
    res = inference.evaluate_dataset(
        predict, batches, crop_border=border,
        stride=model.stride, tile=tile if tile is not None else cfg.eval_tile,
        overlap=overlap if overlap is not None else cfg.eval_tile_overlap,
        ensemble=ensemble, max_images=max_images, keep=figures, task=task,
        scale=task.scale(cfg), side_inputs=side, adapt=adapter)
    tag = (f"{loop.dataset_name(cfg).replace('/', '-')}_{split}" + ("_ens" if ensemble else "")
           + (f"_{p.tag}" if p is not None else "") + ("_adapt" if adapt else "")
           + ("_consistent" if consistent else ""))
    out = Path(out) if out is not None else run.workdir / f"eval_{tag}.json"
    if p is not None:
        info["perturb"] = p.record(perturb_seed)
        if p.kind == "srf":
            info["perturb"]["training_srf"] = training_srf(run)[1]
    report.write_eval_json(out, res, method=cfg.method, dataset=loop.dataset_name(cfg),
                           split=split, checkpoint=run.which, task=task.name,
                           adapt=loop.adapt_settings(cfg) if adapt else None, **info)
    if figures and res["examples"]:
        report.save_figures(out.parent / f"figures_{tag}", res["examples"])
    res["path"] = str(out)
    res["dataset"], res["split"] = loop.dataset_name(cfg), split
    res["perturb"] = info.get("perturb")
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
    p.add_argument("--adapt", "--tta", action="store_true",
                   help="per-image test-time adaptation (the method's adapt_loss); --tta is "
                        "the same option (MCGA's name for it)")
    p.add_argument("--adapt-steps", type=int, default=None, help="default: config.adapt_steps")
    p.add_argument("--adapt-lr", type=float, default=None, help="default: config.adapt_lr")
    p.add_argument("--perturb", default=None, metavar="NAME",
                   help="robustness protocol applied to every image before prediction "
                        "(docs/robustness.md): brightness+10, brightness-10, mixed, noise, "
                        "jpeg, srf:NAME (an SRF of jaxspec.physics.list_srfs())")
    p.add_argument("--perturb-seed", type=int, default=0,
                   help="seed of the random protocols (mixed, noise); default 0")
    p.add_argument("--consistent", action="store_true",
                   help="project each predicted spectrum onto the spectra that reproduce its "
                        "input RGB through the data's SRF (physically plausible reconstruction; "
                        "linear RGB runs, rgb_norm none)")
    a = p.parse_args(argv)
    from jaxspec.train.workdir import check_output_writable
    if a.tile is not None and a.tile < 1:
        raise UsageError(f"--tile must be a positive number of pixels, got {a.tile}")
    if a.overlap is not None and (a.overlap < 0 or (a.tile and a.overlap >= a.tile)):
        raise UsageError(f"--overlap must be in [0, --tile), got {a.overlap}")
    if a.perturb is not None:
        from jaxspec import robustness
        robustness.parse(a.perturb)          # a bad name fails before the run is loaded
    check_output_writable(Path(a.out).absolute().parent if a.out else a.workdir,
                          what="evaluation output directory")
    res = evaluate_workdir(a.workdir, dataset=a.dataset, split=a.split, data_dir=a.data_dir,
                           manual_dir=a.manual_dir, ensemble=a.ensemble, tile=a.tile,
                           overlap=a.overlap, crop_border=a.crop_border, which=a.which,
                           max_images=a.max_images, out=a.out, figures=a.figures,
                           adapt=a.adapt, adapt_steps=a.adapt_steps, adapt_lr=a.adapt_lr,
                           perturb=a.perturb, perturb_seed=a.perturb_seed,
                           consistent=a.consistent)
    print(json.dumps({"dataset": res["dataset"], "split": res["split"],
                      "perturb": a.perturb, "consistent": a.consistent,
                      "images": res["num_images"], "mean": res["mean"], "path": res["path"]},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
