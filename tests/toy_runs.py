"""Helpers shared by the test files: a small, seeded classification run built the same way everywhere.

A module of its own, not conftest.py: tests/browser has a conftest.py too, and two modules named conftest
cannot both be imported by that name."""
from __future__ import annotations

import os
import shutil

import torch

from trainloop_nb.callbacks.progress import ProgressPrinter
from trainloop_nb.core import Callback, Event
from trainloop_nb.data import TrainingEpochs, ValidationBatches
from trainloop_nb.loop import TrainingLoop


def quiet_printer() -> ProgressPrinter:
    "A progress printer that writes its plain lines nowhere (it still runs, and replaces the default one)."
    return ProgressPrinter(mode="plain", file=open(os.devnull, "w"))


def toy_data(samples: int, features: int, classes: int = 2, seed: int = 0, rule: str = "projection"):
    "Random inputs and labels a linear model can learn: `rule` is 'projection' (argmax of a random map) or 'sign' (x0 > x1)."
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, features, generator=g)
    if rule == "sign": y = (x[:, 0] - x[:, 1] > 0).long()
    elif rule == "first": y = (x[:, 0] > 0).long()
    else: y = (x @ torch.randn(features, classes, generator=g)).argmax(1)
    return x, y


def toy_loop(callbacks=(), *, train: int, valid: int, features: int, classes: int = 2, batch_size: int = 32,
             valid_batch_size: int = 32, lr: float = 0.1, metrics=("accuracy",), validation: bool = True, seed: int = 0,
             rule: str = "projection", printer: bool = True, defaults: bool = True):
    "A `TrainingLoop` over `train` + `valid` toy samples with a `Linear(features, classes)` model; returns (loop, model)."
    x, y = toy_data(train + valid, features, classes, seed, rule)
    torch.manual_seed(seed)
    model = torch.nn.Linear(features, classes)
    extra = [quiet_printer()] if printer else []
    loop = TrainingLoop(TrainingEpochs((x[:train], y[:train]), batch_size=batch_size),
                        ValidationBatches((x[train:], y[train:]), batch_size=valid_batch_size) if validation else None,
                        torch.optim.SGD(model.parameters(), lr=lr), metrics=list(metrics),
                        callbacks=[*extra, *callbacks], include_default_callbacks=defaults)
    return loop, model


DISPLAY_MODULES = ("fastprogress", "matplotlib", "ipywidgets", "IPython")


def display_modules_loaded_by(statement: str) -> list[str]:
    "The display modules (and trainloop_nb.callbacks modules) a fresh interpreter holds after running `statement`."
    import subprocess, sys
    probe = (f"import sys; {statement}; print(sorted(m for m in sys.modules if m.split('.')[0] in {DISPLAY_MODULES!r} "
             "or m.startswith('trainloop_nb.callbacks')))")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return eval(run.stdout)  # a printed list of module names


def cxx_compiler() -> str | None:
    "A C++ compiler torch.compile's CPU backend can use, or None."
    return next((c for c in ("g++", "c++", "clang++", "gcc", "cc") if shutil.which(c)), None)


class InterruptAt(Callback):
    "Raises `error` at the `n`-th time `event` fires (counting from 1): after the loggers (order 0), before EMA (60) and Checkpoint (100)."
    order = 50  # handlers after one that raises do not see the event, as with any error: the CSV row is written first

    def __init__(self, event: Event, n: int, error=KeyboardInterrupt):
        self.event, self.n, self.error, self.count = event, n, error, 0
        setattr(self, event.value, self._maybe)

    def _maybe(self, loop):
        self.count += 1
        if self.count == self.n: raise self.error()
