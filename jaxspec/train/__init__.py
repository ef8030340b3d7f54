"""Training engine: state, step kinds, sharding, checkpoints and the loop.

``train_and_evaluate(config, workdir)`` is the entry point used by ``train.py`` / notebooks.
"""
from jaxspec.train.loop import train_and_evaluate
from jaxspec.train.optim import label_params, make_optimizer, make_schedule
from jaxspec.train.state import TrainState, create_train_state
from jaxspec.train.steps import build_train_step, register_step_kind, step_kinds

__all__ = ["train_and_evaluate", "TrainState", "create_train_state", "build_train_step",
           "register_step_kind", "step_kinds", "make_optimizer", "make_schedule", "label_params"]
