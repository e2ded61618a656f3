"""Training and evaluation: :func:`setup` builds a run, :func:`train_step` takes one optimizer
step, :func:`fit` trains to ``max_steps``, :func:`evaluate` scores the eval split.

Modules, bottom up: ``metrics`` (metrics.jsonl, TensorBoard, the log), ``state`` (the
:class:`Run` and its checkpoint dict), ``build`` (``setup``, the compile decision), ``step``,
``signals`` (Ctrl-C / SIGTERM) and ``loop``.
"""

from sparsetrain.training.build import setup
from sparsetrain.training.loop import evaluate, fit, save
from sparsetrain.training.state import Run, TrainingError, checkpoint_state
from sparsetrain.training.step import train_step

__all__ = ["Run", "TrainingError", "checkpoint_state", "evaluate", "fit", "save", "setup", "train_step"]
