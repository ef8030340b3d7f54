"""Import official PyTorch checkpoints into jaxspec workdirs.

    python -m jaxspec.convert mstpp mst_plus_plus.pth --workdir runs/mstpp_official

turns the official MST++ checkpoint (``caiyuanhao1998/MST-plus-plus``: a ``torch.save`` dict
whose ``state_dict`` names carry the ``module.`` prefix of ``nn.DataParallel``; a bare
``state_dict`` works too) into a workdir that ``python -m jaxspec.evaluate``,
``python -m jaxspec.predict`` and :func:`jaxspec.load` use unchanged. The workdir's
``config.json`` is the method's ``paper`` preset with the architecture read off the checkpoint
and the official inference protocol (per-image min-max RGB, ``rgb_norm="minmax"``); the
weights are written through :class:`jaxspec.train.checkpointing.Checkpointer` as the run's
(only) best checkpoint, at step 0, with no validation metric (``mrae = inf``).

A conversion is a table of rules ``(torch-name regex, flax-path template, layout)``; every
torch tensor must match exactly one rule, every Flax parameter must be produced once, and the
shapes must agree after the layout change -- otherwise :class:`ConversionError` names the
offending keys. Layouts:

* ``conv``: ``Conv2d`` weight ``(O, I, kh, kw)`` -> ``(kh, kw, I, O)`` (a depthwise weight
  ``(C, 1, kh, kw)`` becomes the grouped layout ``(kh, kw, 1, C)``);
* ``convT``: ``ConvTranspose2d`` weight ``(I, O, kh, kw)`` -> ``(kh, kw, I, O)`` (no spatial
  flip; see :class:`jaxspec.layers.ConvTranspose2d`);
* ``linear``: ``Linear`` weight ``(O, I)`` -> ``(I, O)``;
* ``same``: biases, LayerNorm weight/bias (``weight`` -> ``scale``), MS-MSA ``rescale``.

torch is needed only to read ``.pth`` files (``pip install "jaxspec[convert]"``); the
conversion itself works on any mapping of names to numpy arrays (:func:`convert_state_dict`).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

__all__ = ["ConversionError", "Rule", "LAYOUTS", "CONVERTERS", "load_torch_state_dict",
           "strip_prefix", "convert_state_dict", "mstpp_rules", "mstpp_model_kwargs",
           "convert_checkpoint", "write_workdir", "reference_code", "load_module_from_file",
           "main"]


class ConversionError(ValueError):
    """A checkpoint does not fit the target model (unknown/missing keys, shape mismatches)."""


LAYOUTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "conv": lambda w: np.transpose(w, (2, 3, 1, 0)),
    "convT": lambda w: np.transpose(w, (2, 3, 0, 1)),
    "linear": lambda w: np.transpose(w, (1, 0)),
    "same": lambda w: w,
}


@dataclasses.dataclass(frozen=True)
class Rule:
    """``torch`` is a regex (full match) with named groups; ``flax`` a ``str.format`` template
    over those groups (plus any derived values from ``derive``); ``layout`` a key of
    :data:`LAYOUTS`."""
    torch: str
    flax: str
    layout: str = "same"
    derive: Callable[[dict], dict] | None = None

    def apply(self, name: str) -> str | None:
        m = re.fullmatch(self.torch, name)
        if m is None:
            return None
        groups = m.groupdict()
        if self.derive is not None:
            groups = {**groups, **self.derive(groups)}
        return self.flax.format(**groups)


# ----------------------------------------------------------------------------------------------
# Reading checkpoints
# ----------------------------------------------------------------------------------------------
def strip_prefix(state_dict: Mapping[str, Any], prefix: str = "module.") -> dict[str, Any]:
    """Remove ``prefix`` from every key that has it (``nn.DataParallel`` adds ``module.``)."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state_dict.items()}


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """``{name: float32 numpy array}`` from a ``torch.save`` file.

    Accepts a bare ``state_dict`` or a dict holding it under ``state_dict`` (the official MST++
    checkpoints), ``model`` or ``net``; strips a ``module.`` prefix. Loaded with
    ``weights_only=True`` (no code in the file is executed).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading a PyTorch checkpoint needs torch: pip install "
                          "'jaxspec[convert]' (CPU wheel: pip install 'torch==2.13.0+cpu')") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises pickle/zip/runtime errors on bad files
        from jaxspec.errors import InputError
        why = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
        if "Weights only load failed" in why:
            why = "torch.load(weights_only=True) refused it: not a torch.save file of tensors"
        raise InputError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: "
                         f"{why[:300]})") from e
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "net"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise ConversionError(f"{path}: expected a state_dict (or a dict with key 'state_dict'), "
                              f"got {type(obj).__name__}")
    out = {}
    for k, v in strip_prefix(obj).items():
        if not hasattr(v, "detach"):
            raise ConversionError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
        out[k] = v.detach().cpu().to(torch.float32).numpy()
    return out


# ----------------------------------------------------------------------------------------------
# Generic conversion
# ----------------------------------------------------------------------------------------------
def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def _unflatten(flat: Mapping[str, Any]) -> dict:
    out: dict = {}
    for key, v in flat.items():
        node = out
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def _list(names: Sequence[str], limit: int = 12) -> str:
    names = sorted(names)
    more = f" ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def convert_state_dict(state_dict: Mapping[str, np.ndarray], rules: Sequence[Rule],
                       target: Mapping[str, Any]) -> dict:
    """Flax ``params`` tree from a torch ``state_dict`` (names -> arrays) by ``rules``.

    ``target`` is the model's params tree (arrays or ``ShapeDtypeStruct``s) that fixes the
    expected paths and shapes. Raises :class:`ConversionError` naming every torch key no rule
    maps (or that maps to a path the model lacks), every model parameter left unset, and every
    shape mismatch.
    """
    expected = {k: tuple(v.shape) for k, v in _flatten(target).items()}
    out: dict[str, np.ndarray] = {}
    source: dict[str, str] = {}
    unknown, mismatch, mismatched = [], [], set()
    for name, value in state_dict.items():
        hits = [(r, p) for r in rules if (p := r.apply(name)) is not None]
        if not hits:
            unknown.append(name)
            continue
        rule, path = hits[0]
        if path not in expected:
            unknown.append(f"{name} (-> {path}, not a parameter of the model)")
            continue
        if path in out:
            raise ConversionError(f"torch keys {source[path]!r} and {name!r} both map to {path}")
        arr = np.asarray(value, np.float32)
        want_ndim = {"conv": 4, "convT": 4, "linear": 2}.get(rule.layout)
        if want_ndim is not None and arr.ndim != want_ndim:
            mismatch.append(f"{name} {tuple(arr.shape)} is not a {rule.layout} weight "
                            f"({want_ndim}-D) for {path} {expected[path]}")
            mismatched.add(path)
            continue
        arr = np.ascontiguousarray(LAYOUTS[rule.layout](arr))
        if tuple(arr.shape) != expected[path]:
            mismatch.append(f"{name} {tuple(np.asarray(value).shape)} -> {path}: "
                            f"{tuple(arr.shape)} after '{rule.layout}' layout, model expects "
                            f"{expected[path]}")
            mismatched.add(path)
            continue
        out[path], source[path] = arr, name
    missing = sorted(set(expected) - set(out) - mismatched)
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} unknown checkpoint key(s): {_list(unknown)}")
    if missing:
        problems.append(f"{len(missing)} model parameter(s) missing from the checkpoint: "
                        f"{_list(missing)}")
    if mismatch:
        problems.append(f"{len(mismatch)} shape mismatch(es): " + "; ".join(mismatch[:8]))
    if problems:
        raise ConversionError("checkpoint does not match the model: " + " | ".join(problems))
    return _unflatten(out)


# ----------------------------------------------------------------------------------------------
# MST++
# ----------------------------------------------------------------------------------------------
_MSTPP_LEVELS = 2   # MST++ builds every SST as MST(stage=2): two encoder levels


def _msab_rules(torch_prefix: str, flax_prefix: str, derive=None) -> list[Rule]:
    """One MST++ ``MSAB`` block: ``blocks.{k}.0`` = MS_MSA, ``blocks.{k}.1`` = PreNorm(FFN)."""
    t = torch_prefix + r"\.blocks\.(?P<k>\d+)\."
    f = flax_prefix + "_block_{k}/"
    table = [
        (r"0\.rescale", "msa/rescale", "same"),
        (r"0\.(?P<qkv>to_q|to_k|to_v|proj)\.weight", "msa/{qkv}/kernel", "linear"),
        (r"0\.proj\.bias", "msa/proj/bias", "same"),
        (r"0\.pos_emb\.0\.weight", "msa/pos_emb_0/kernel", "conv"),
        (r"0\.pos_emb\.2\.weight", "msa/pos_emb_1/kernel", "conv"),
        (r"1\.norm\.weight", "norm/scale", "same"),
        (r"1\.norm\.bias", "norm/bias", "same"),
        (r"1\.fn\.net\.0\.weight", "ffn/conv_0/kernel", "conv"),
        (r"1\.fn\.net\.2\.weight", "ffn/dwconv/kernel", "conv"),
        (r"1\.fn\.net\.4\.weight", "ffn/conv_1/kernel", "conv"),
    ]
    return [Rule(t + pat, f + path, layout, derive) for pat, path, layout in table]


def mstpp_rules(levels: int = _MSTPP_LEVELS) -> list[Rule]:
    """Rules from ``MST_Plus_Plus.state_dict()`` names to :class:`~jaxspec.models.mstpp.MSTPlusPlus`
    parameter paths (decoder ``i`` of the reference is our level ``levels - 1 - i``)."""
    def dec(g):
        return {"lvl": levels - 1 - int(g["i"])}

    body = r"body\.(?P<s>\d+)\."
    fb = "body_{s}/"
    rules = [
        Rule(r"conv_in\.weight", "conv_in/kernel", "conv"),
        Rule(r"conv_out\.weight", "conv_out/kernel", "conv"),
        Rule(body + r"embedding\.weight", fb + "embedding/kernel", "conv"),
        Rule(body + r"mapping\.weight", fb + "mapping/kernel", "conv"),
        Rule(body + r"encoder_layers\.(?P<l>\d+)\.1\.weight", fb + "down_{l}/kernel", "conv"),
        Rule(body + r"decoder_layers\.(?P<i>\d+)\.0\.weight", fb + "up_{lvl}/kernel", "convT",
             dec),
        Rule(body + r"decoder_layers\.(?P<i>\d+)\.0\.bias", fb + "up_{lvl}/bias", "same", dec),
        Rule(body + r"decoder_layers\.(?P<i>\d+)\.1\.weight", fb + "fuse_{lvl}/kernel", "conv",
             dec),
    ]
    rules += _msab_rules(body + r"encoder_layers\.(?P<l>\d+)\.0", fb + "encoder_{l}")
    rules += _msab_rules(body + r"bottleneck", fb + "bottleneck")
    rules += _msab_rules(body + r"decoder_layers\.(?P<i>\d+)\.2", fb + "decoder_{lvl}", dec)
    return rules


def mstpp_model_kwargs(state_dict: Mapping[str, np.ndarray]) -> dict:
    """``MSTPlusPlus`` architecture read off an official state_dict (``in_channels``,
    ``out_channels``, ``n_feat`` from ``conv_in``/``conv_out``, ``stage`` = number of bodies)."""
    for key in ("conv_in.weight", "conv_out.weight"):
        if key not in state_dict:
            raise ConversionError(f"not an MST++ state_dict: no {key!r} (keys start with "
                                  f"{_list(list(state_dict), 5)})")
    w_in, w_out = np.shape(state_dict["conv_in.weight"]), np.shape(state_dict["conv_out.weight"])
    bodies = {int(m.group(1)) for k in state_dict if (m := re.match(r"body\.(\d+)\.", k))}
    if not bodies or bodies != set(range(len(bodies))):
        raise ConversionError(f"MST++ state_dict: body indices must be 0..S-1, got "
                              f"{sorted(bodies)}")
    return dict(in_channels=int(w_in[1]), out_channels=int(w_out[0]), n_feat=int(w_in[0]),
                stage=len(bodies))


@dataclasses.dataclass(frozen=True)
class Converter:
    rules: Callable[[], list[Rule]]
    model_kwargs: Callable[[Mapping[str, np.ndarray]], dict]
    config_updates: Mapping[str, Any]
    source: str


CONVERTERS: dict[str, Converter] = {
    "mstpp": Converter(
        rules=mstpp_rules, model_kwargs=mstpp_model_kwargs,
        # The official test/predict code: per-image min-max RGB (one min and max over the
        # image), reflect-pad to x8 (the model does it), full image, 128-px border for scores.
        config_updates=dict(rgb_norm="minmax", eval_crop_border=128),
        source="caiyuanhao1998/MST-plus-plus (official PyTorch MST++)"),
}


def convert_checkpoint(method: str, state_dict: Mapping[str, np.ndarray],
                       preset: str = "paper"):
    """``(Config, variables)`` for ``method`` from a torch ``state_dict`` (names -> arrays;
    a ``module.`` prefix is stripped). The config is ``preset`` with the checkpoint's
    architecture and the official inference protocol."""
    import jax
    import jax.numpy as jnp

    from jaxspec import registry
    if method not in CONVERTERS:
        raise ValueError(f"no converter for method {method!r}; available: {sorted(CONVERTERS)}")
    conv = CONVERTERS[method]
    state_dict = strip_prefix(state_dict)
    m = registry.get(method)
    base = m.config(preset)
    cfg = base.replace(model={**dict(base.model), **conv.model_kwargs(state_dict)},
                       **dict(conv.config_updates))
    module = m.model(cfg)
    s = m.stride * 2
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, s, s, 3)))
    params = convert_state_dict(state_dict, conv.rules(), shapes["params"])
    if shapes.get("batch_stats"):
        raise ConversionError(f"{method}: converting batch statistics is not implemented")
    return cfg, {"params": jax.tree.map(jnp.asarray, params)}


def write_workdir(workdir: str | os.PathLike, config, variables: Mapping[str, Any],
                  meta: Mapping[str, Any] | None = None) -> Path:
    """Write ``config.json``, ``converted.json`` (``meta``: where the weights came from) and
    ``variables`` as the best checkpoint (step 0, ``mrae = inf``: never validated here) of a new
    workdir; refuses a workdir that already holds checkpoints."""
    from jaxspec.fs import write_json_atomic
    from jaxspec.train import checkpointing
    workdir = Path(workdir).absolute()
    if checkpointing.has_checkpoint(workdir):
        raise ValueError(f"{workdir} already holds checkpoints; choose a new --workdir")
    workdir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(workdir / "config.json", config.to_dict())
    write_json_atomic(workdir / "converted.json", dict(meta or {}))
    tree = {"params": variables["params"],
            **{k: v for k, v in variables.items() if k != "params" and v}}
    run_meta = {"step": 0, "run_id": checkpointing.new_run_id(), **dict(meta or {})}
    with checkpointing.Checkpointer(workdir / "checkpoints", async_save=False) as ck:
        ck.save_best(0, tree, {"mrae": math.inf}, run_meta)
        ck.wait()
    return workdir


def reference_code(relpath: str) -> Path | None:
    """Path of a file of the official reference code (tests and benchmarks only; the project
    never ships it): ``$JAXSPEC_REFERENCE/<relpath>``, else ``shared/reference/<relpath>``
    beside the checkout or one level above it (worktrees); ``None`` when absent."""
    env = os.environ.get("JAXSPEC_REFERENCE")
    repo = Path(__file__).resolve().parents[1]
    roots = [Path(env)] if env else [repo.parent / "shared" / "reference",
                                     repo.parents[1] / "shared" / "reference"]
    for root in roots:
        if (root / relpath).is_file():
            return root / relpath
    return None


def load_module_from_file(path: str | os.PathLike, name: str | None = None):
    """Import a Python file as a module (the official reference code, for tests/benchmarks)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    name = name or f"_jaxspec_ref_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> int:
    """``python -m jaxspec.convert``: :func:`_main` under :func:`jaxspec.errors.run_cli` (user
    errors: one line ``jaxspec.convert: error: ...`` on stderr; exit 2 for a bad argument or
    checkpoint file, 6 for an unwritable ``--workdir``; docs/reliability.md)."""
    from jaxspec.errors import run_cli
    return run_cli(_main, argv, prog="jaxspec.convert")


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxspec.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("method", choices=sorted(CONVERTERS))
    p.add_argument("checkpoint", help="PyTorch checkpoint (.pth) saved with torch.save")
    p.add_argument("--workdir", required=True, help="new jaxspec workdir to write")
    p.add_argument("--preset", default="paper", help="preset the config starts from")
    a = p.parse_args(argv)
    from jaxspec import registry
    from jaxspec.errors import InputNotFoundError, UsageError
    from jaxspec.train import checkpointing
    from jaxspec.train.workdir import check_output_writable
    # every check before torch is imported and the checkpoint read
    ckpt = Path(a.checkpoint)
    if not ckpt.is_file():
        raise InputNotFoundError(f"checkpoint file not found: {ckpt}")
    registry.get(a.method).config(a.preset)           # unknown preset: UsageError
    workdir = Path(a.workdir).absolute()
    if checkpointing.has_checkpoint(workdir):
        raise UsageError(f"{workdir} already holds checkpoints; choose a new --workdir")
    check_output_writable(workdir, what="--workdir")
    try:
        sd = load_torch_state_dict(ckpt)
    except ImportError as e:
        raise UsageError(str(e)) from e
    meta = {"converted_from": str(ckpt.absolute()), "source": CONVERTERS[a.method].source}
    cfg, variables = convert_checkpoint(a.method, sd, a.preset)
    wd = write_workdir(workdir, cfg, variables, meta)
    n = sum(int(np.prod(v.shape)) for v in _flatten(variables["params"]).values())
    print(f"converted {len(sd)} tensors ({n:,} parameters) of {a.checkpoint} -> {wd}\n"
          f"  model {dict(cfg.model)}, rgb_norm={cfg.rgb_norm!r}\n"
          f"  next: python -m jaxspec.predict --workdir {wd} photo.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
