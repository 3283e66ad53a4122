"""LiveLossPlot: its data against loop.history and an independent per-step oracle, files, redraw throttling, and scripts without IPython."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import matplotlib.image
import pytest
import torch

from trainloop_nb.callbacks.charts import LiveLossPlot
from trainloop_nb.core import Callback, CancelBatch, Order
from trainloop_nb.data import TrainingEpochs, ValidationBatches
from trainloop_nb.loop import TrainingLoop

from conftest import toy_loop
from trainloop_nb.callbacks.progress import ProgressPrinter

TRAIN_BATCHES = 8  # 256 samples in batches of 32


def make_loop(callbacks=(), validation=True, seed=0):
    return toy_loop(callbacks, train=256, valid=44, features=6, valid_batch_size=20, lr=0.2, validation=validation,
                    seed=seed, rule="sign")


class StepLosses(Callback):
    "The oracle: each optimizer step's loss, read at once with .item()."
    def __init__(self): self.losses = {}
    def batch_end(self, loop):
        if loop.phase == "training" and loop.last_step_loss is not None and loop.step not in self.losses:
            self.losses[loop.step] = loop.last_step_loss.item()


def test_data_matches_history_and_per_step_losses():
    plot, oracle = LiveLossPlot(mode="console"), StepLosses()
    loop, model = make_loop([plot, oracle])
    history = loop.fit(model, epochs=3)
    assert plot.epochs == [h["epoch"] for h in history] == [1, 2, 3]
    assert plot.valid_losses == [h["valid_loss"] for h in history]
    assert plot.epoch_train_losses == [h["train_loss"] for h in history]
    assert plot.epoch_steps == [8, 16, 24]
    assert plot.steps == list(oracle.losses) == list(range(1, 3 * TRAIN_BATCHES + 1))
    assert plot.train_losses == pytest.approx(list(oracle.losses.values()), rel=1e-6)
    for e, h in enumerate(history):  # equal batch sizes: the epoch loss is the mean of the step losses
        assert sum(plot.train_losses[8 * e: 8 * (e + 1)]) / 8 == pytest.approx(h["train_loss"], rel=1e-6)


def test_without_validation_the_valid_losses_are_nan():
    plot = LiveLossPlot(mode="console")
    loop, model = make_loop([plot], validation=False)
    loop.fit(model, epochs=2)
    assert len(plot.valid_losses) == 2 and all(math.isnan(v) for v in plot.valid_losses)
    assert plot.epoch_train_losses == [h["train_loss"] for h in loop.history]


def test_cancelled_steps_are_not_recorded():
    class SkipOddSteps(Callback):
        def update_start(self, loop):
            if loop.batch_index % 2: raise CancelBatch()
    plot, oracle = LiveLossPlot(mode="console"), StepLosses()
    loop, model = make_loop([SkipOddSteps(), plot, oracle])
    loop.fit(model, epochs=1)
    assert loop.step == TRAIN_BATCHES // 2
    assert plot.steps == [1, 2, 3, 4] == list(oracle.losses)
    assert plot.train_losses == pytest.approx(list(oracle.losses.values()), rel=1e-6)


def test_a_second_fit_starts_a_new_picture():
    plot = LiveLossPlot(mode="console")
    loop, model = make_loop([plot])
    loop.fit(model, epochs=2)
    loop.fit(model, epochs=1)
    assert plot.epochs == [1] and plot.steps == list(range(1, TRAIN_BATCHES + 1))


def test_console_with_path_saves_a_png_at_each_epoch_end(tmp_path):
    path = tmp_path / "charts" / "loss.png"
    sizes = []

    class CheckFile(Callback):
        order = 5  # after LiveLossPlot (order 0) at epoch_end
        def epoch_end(self, loop): sizes.append(path.stat().st_size if path.exists() else None)
    plot = LiveLossPlot(mode="console", path=path, figsize=(4, 3))
    loop, model = make_loop([plot, CheckFile()])
    loop.fit(model, epochs=2)
    assert len(sizes) == 2 and all(sizes)
    image = matplotlib.image.imread(path)  # an independent PNG reader
    assert image.shape[:2] == (300, 400)  # figsize (4, 3) at the default 100 dpi
    assert image[..., :3].std() > 0  # something is drawn
    figure = plot.figure()
    per_step, per_epoch, valid = figure.axes[0].lines
    assert list(per_step.get_xdata()) == plot.steps and list(valid.get_ydata()) == plot.valid_losses


def test_fit_end_saves_the_steps_of_an_interrupted_epoch(tmp_path):
    class FailAtStep(Callback):
        order = Order.observe  # before the plot, which runs among the display callbacks
        def batch_end(self, loop):
            if loop.phase == "training" and loop.step == TRAIN_BATCHES + 3: raise RuntimeError("boom")
    path = tmp_path / "loss.png"
    plot = LiveLossPlot(mode="console", path=path)
    loop, model = make_loop([FailAtStep(), plot])
    with pytest.raises(RuntimeError):
        loop.fit(model, epochs=3)
    assert path.exists() and plot.epochs == [1]
    assert plot.steps == list(range(1, TRAIN_BATCHES + 3))  # FailAtStep runs first: step 11's batch_end never reaches the plot


def test_notebook_mode_redraws_at_epoch_ends_and_when_refresh_allows(monkeypatch):
    pytest.importorskip("IPython")
    shown = []
    plot = LiveLossPlot(mode="notebook", refresh=3600)
    monkeypatch.setattr(plot, "_show", lambda figure: shown.append(len(plot.steps)))
    monkeypatch.setattr(plot, "figure", lambda: setattr(plot, "_figure", "drawn"))  # drawing costs nothing here
    loop, model = make_loop([plot])
    loop.fit(model, epochs=3)
    assert shown == [8, 16, 24]  # once per epoch end; fit_end has nothing new
    plot.refresh = 0.0
    shown.clear()
    loop.fit(model, epochs=1)
    assert shown == list(range(1, TRAIN_BATCHES + 1)) + [TRAIN_BATCHES]  # every step, then the epoch end


def test_slow_redraws_are_spaced_out_to_bound_their_cost(monkeypatch):
    pytest.importorskip("IPython")
    import time
    shown = []
    plot = LiveLossPlot(mode="notebook", refresh=0.0)
    monkeypatch.setattr(plot, "_show", lambda figure: shown.append(len(plot.steps)))
    def slow_figure():  # a redraw that takes 0.1 s
        time.sleep(0.1); plot._figure = "drawn"
    monkeypatch.setattr(plot, "figure", slow_figure)
    loop, model = make_loop([plot])
    loop.fit(model, epochs=1)
    # after the first step's redraw, the next may come only 0.9 s later: the 8 steps are long done,
    # so what is left is the epoch end's redraw
    assert shown == [1, TRAIN_BATCHES]


def test_notebook_mode_updates_one_display_in_place(monkeypatch):
    ipython_display = pytest.importorskip("IPython.display")
    calls = []

    class Handle:
        def update(self, obj): calls.append(("update", obj))
    monkeypatch.setattr(ipython_display, "display", lambda obj, display_id=None: calls.append(("display", obj)) or Handle())
    plot = LiveLossPlot(mode="notebook", refresh=3600)
    loop, model = make_loop([plot])
    loop.fit(model, epochs=2)
    assert [kind for kind, _ in calls] == ["display", "update"]
    assert all(isinstance(obj, ipython_display.Image) and obj.data[:4] == b"\x89PNG" for _, obj in calls)


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode"): LiveLossPlot(mode="terminal")
    with pytest.raises(ValueError, match="refresh"): LiveLossPlot(refresh=-1)


SCRIPT = """
import sys, io, torch
import trainloop_nb.callbacks.charts
from trainloop_nb.callbacks.charts import LiveLossPlot
from trainloop_nb.data import TrainingEpochs
from trainloop_nb.loop import TrainingLoop
x = torch.randn(64, 4); y = (x[:, 0] > 0).long(); model = torch.nn.Linear(4, 2)
plot = LiveLossPlot(PATH)
loop = TrainingLoop(TrainingEpochs((x, y), 16), None, torch.optim.SGD(model.parameters(), lr=0.1), callbacks=[plot])
loop.fit(model, epochs=2)
assert len(plot.train_losses) == 8 and plot.epochs == [1, 2]
print([m for m in ("IPython", "ipywidgets", "matplotlib") if m in sys.modules])
"""


@pytest.mark.parametrize("with_path", [False, True])
def test_a_console_fit_imports_no_ipython_or_widgets(tmp_path, with_path):
    path = repr(str(tmp_path / "loss.png")) if with_path else "None"
    code = SCRIPT.replace("PATH", f"path={path}")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if k not in ("DISPLAY", "MPLBACKEND")})  # headless
    assert out.returncode == 0, out.stderr
    loaded = eval(out.stdout.strip().splitlines()[-1])
    assert "IPython" not in loaded and "ipywidgets" not in loaded
    assert ("matplotlib" in loaded) == with_path  # matplotlib only when there is a file to draw
    assert (tmp_path / "loss.png").exists() == with_path
