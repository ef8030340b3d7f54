"""Command line for training: ``python train.py --method mstpp [...]``.

Flags override the method preset (``--preset``; default ``cpu`` on a CPU backend, ``paper``
otherwise); ``--set key=value`` overrides any :class:`~jaxspec.configs.base.Config` field,
typed by the field (``--set lr=2e-4 --set grad_clip=none --set model.n_feat=16``).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from jaxspec.configs.base import Config, apply_overrides


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--method", required=True, help="registered method (e.g. mstpp)")
    p.add_argument("--preset", default=None,
                   help="config preset; default: 'cpu' on a CPU backend, else 'paper'")
    p.add_argument("--dataset", default=None,
                   help="dataset name, optionally with builder config: spectral_scenes, "
                        "spectral_scenes/real, arad1k ... (default: the preset's)")
    p.add_argument("--data-dir", default=None, help="TFDS data directory")
    p.add_argument("--manual-dir", default=None, help="manually downloaded files (real data)")
    p.add_argument("--workdir", default=None, help="output directory (default runs/<method>)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="global batch size")
    p.add_argument("--crop", type=int, default=None, help="training crop size")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--init-from", default=None, metavar="WORKDIR|FILE.npz:TARGET",
                   help="start from the weights of another run (fine-tuning; for MCGA stage 2: "
                        "a stage-1 or mixture-of-codebooks run), or put the variable tree of an "
                        ".npz file at TARGET (e.g. USSR's segmenter: e1.npz:E1)")
    p.add_argument("--freeze", action="append", default=None, metavar="REGEX",
                   help="keep the parameters whose '/'-joined path matches REGEX at their "
                        "initial values (repeatable; e.g. '^E1/')")
    p.add_argument("--resume", dest="resume", action="store_true", default=True,
                   help="continue from the latest checkpoint in the workdir (default)")
    p.add_argument("--no-resume", dest="resume", action="store_false",
                   help="refuse to start if the workdir already holds checkpoints")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable)")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard event files to <workdir>/tensorboard")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--print-config", action="store_true", help="print the config and exit")
    from jaxspec import distributed
    distributed.add_arguments(p)
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    import jax

    from jaxspec import registry
    method = registry.get(args.method)
    preset = args.preset or ("cpu" if jax.default_backend() == "cpu" else "paper")
    cfg = method.config(preset)
    updates = {}
    if args.dataset is not None:
        name, _, sub = args.dataset.partition("/")
        updates.update(dataset=name, dataset_config=sub or None)
    for flag, field in (("data_dir", "data_dir"), ("manual_dir", "manual_dir"),
                        ("steps", "steps"), ("batch_size", "batch_size"), ("crop", "crop"),
                        ("seed", "seed")):
        v = getattr(args, flag)
        if v is not None:
            updates[field] = v
    if args.init_from is not None:
        updates["init_from"] = (_init_from_entry(args.init_from),)
    if args.freeze:
        updates["frozen"] = tuple(cfg.frozen) + tuple(args.freeze)
    cfg = cfg.replace(**updates) if updates else cfg
    return apply_overrides(cfg, args.overrides)


def _init_from_entry(value: str) -> dict:
    """``--init-from``: a workdir, or ``FILE.npz:TARGET`` (``FILE.npz`` alone: the whole
    tree). Missing paths are input errors (exit 2) before anything is built."""
    from pathlib import Path

    from jaxspec.errors import InputNotFoundError, UsageError
    path, sep, target = value.rpartition(":") if ".npz:" in value else (value, "", "")
    if path.endswith(".npz"):
        if not Path(path).is_file():
            raise InputNotFoundError(f"--init-from {value}: no such file {path!r}")
        if sep and not target:
            raise UsageError(f"--init-from {value}: empty TARGET after ':'")
        return {"file": str(Path(path).absolute()), "target": target}
    if not (Path(path) / "config.json").is_file():
        raise InputNotFoundError(f"--init-from {value}: not a jaxspec workdir (no config.json) "
                                 f"nor an .npz file")
    return {"workdir": str(Path(path).absolute())}


def main(argv=None) -> int:
    """``train.py``'s entry point: :func:`_main` under :func:`jaxspec.errors.run_cli` (user
    errors: one line on stderr and the documented exit code, see docs/reliability.md)."""
    from jaxspec.errors import run_cli
    return run_cli(_main, argv, prog="train.py")


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # orbax/tfds log every checkpoint write at INFO through absl: keep their warnings only
    for name in ("absl", "jax._src.xla_bridge"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from jaxspec import distributed
    # before anything touches a JAX backend (config_from_args asks for the default backend)
    multi = distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                                   args.distributed, heartbeat_timeout=args.heartbeat_timeout)
    cfg = config_from_args(args)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    workdir = args.workdir or f"runs/{args.method}"
    from jaxspec.train import train_and_evaluate
    summary = train_and_evaluate(cfg, workdir, resume=args.resume, tensorboard=args.tensorboard,
                                 progress=not args.no_progress, handle_sigint=True)
    import jax
    rank = jax.process_index()
    if multi:   # watchdog off, then every process done before the coordinator goes away
        distributed.stop_watchdog()
        distributed.sync("jaxspec-end")
        distributed.shutdown()
    if rank != 0:
        return 143 if summary.get("preempted") else 0
    print(json.dumps({k: v for k, v in summary.items()}, indent=2, default=str))
    if summary.get("preempted"):
        print(f"interrupted: state saved at step {summary['step']} in {workdir}; run the same "
              f"command again to resume", file=sys.stderr)
        return 143
    return 0


if __name__ == "__main__":
    sys.exit(main())
