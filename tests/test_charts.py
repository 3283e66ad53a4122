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

from toy_runs import toy_loop
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


class Tick(Callback):
    "Moves a fake clock by `seconds` at each training batch_start: the time a batch takes, as the plot sees it."
    order = Order.observe
    def __init__(self, clock: list, seconds: float): self.clock, self.seconds = clock, seconds
    def batch_start(self, loop):
        if loop.phase == "training": self.clock[0] += self.seconds


def test_notebook_mode_redraws_at_epoch_ends_and_when_refresh_allows(monkeypatch):
    pytest.importorskip("IPython")
    shown, clock = [], [0.0]
    plot = LiveLossPlot(mode="notebook", refresh=3.0, clock=lambda: clock[0])
    monkeypatch.setattr(plot, "_show", lambda figure: shown.append(len(plot.steps)))
    monkeypatch.setattr(plot, "figure", lambda: setattr(plot, "_figure", "drawn"))  # drawing takes no time here
    loop, model = make_loop([Tick(clock, 1.0), plot])
    loop.fit(model, epochs=2)
    # a batch a second: due at 3 s (step 3), then 3 s after each draw; each epoch end draws too
    assert shown == [3, 6, 8, 11, 14, 16]  # fit_end has nothing new
    plot.refresh = 0.0
    shown.clear()
    loop.fit(model, epochs=1)
    assert shown == list(range(1, TRAIN_BATCHES + 1)) + [TRAIN_BATCHES]  # every step, then the epoch end


def test_slow_redraws_are_spaced_out_to_bound_their_cost(monkeypatch):
    pytest.importorskip("IPython")
    shown, clock = [], [0.0]
    plot = LiveLossPlot(mode="notebook", refresh=0.0, clock=lambda: clock[0])
    monkeypatch.setattr(plot, "_show", lambda figure: shown.append(len(plot.steps)))
    def slow_figure():  # a redraw that takes 0.125 s (of the fake clock)
        clock[0] += 0.125
        plot._figure = "drawn"
    monkeypatch.setattr(plot, "figure", slow_figure)
    loop, model = make_loop([Tick(clock, 0.25), plot])
    loop.fit(model, epochs=1)
    # step 1 draws (from 0.25 s to 0.375 s); the next draw may come 9 x 0.125 s later, at 1.5 s: step 6
    # (which ends at 1.625 s), then at 2.75 s, after the 8 steps; the epoch end always draws
    assert shown == [1, 6, TRAIN_BATCHES]


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


# -- a bounded curve: a fixed number of points however long the run ------------------------------------------

def brute_force_points(steps, values, width, origin):
    "The oracle: group (step, value) pairs by point number and summarise each group with plain Python."
    groups = {}
    for s, v in zip(steps, values): groups.setdefault((s - origin) // width, []).append((s, v))
    return [(sum(s for s, _ in g) / len(g), sum(v for _, v in g) / len(g), min(v for _, v in g), max(v for _, v in g),
             len(g)) for _, g in sorted(groups.items())]


@pytest.mark.parametrize("seed", range(5))
def test_step_summary_against_a_brute_force_oracle(seed):
    from trainloop_nb.callbacks.charts import StepSummary
    g = torch.Generator().manual_seed(seed)
    steps = (torch.randint(1, 4, (3000,), generator=g).cumsum(0) + 100).tolist()  # increasing, with gaps
    values = torch.randn(3000, generator=g, dtype=torch.float64).tolist()
    summary, start = StepSummary(max_points=64), 0
    while start < len(steps):  # in chunks of random size, as _collect hands them over
        n = int(torch.randint(1, 200, (1,), generator=g))
        summary.add(steps[start:start + n], values[start:start + n])
        start += n
    width = 1
    while (steps[-1] - steps[0]) // width >= 64: width *= 2  # the smallest doubling that fits every step
    assert summary.width == width and len(summary) <= 64
    expected = brute_force_points(steps, values, width, steps[0])
    assert summary.counts == [c for *_, c in expected]
    assert summary.steps == pytest.approx([s for s, *_ in expected], rel=1e-12)
    assert summary.means == pytest.approx([m for _, m, *_ in expected], rel=1e-9, abs=1e-12)
    assert summary.mins == [lo for _, _, lo, _, _ in expected] and summary.maxs == [hi for _, _, _, hi, _ in expected]


def test_step_summary_nan_makes_its_point_nan_and_bad_sizes_are_refused():
    from trainloop_nb.callbacks.charts import StepSummary
    summary = StepSummary(max_points=2)
    summary.add([1, 2, 3, 4], [1.0, math.nan, 2.0, 3.0])
    assert summary.width == 2 and summary.counts == [2, 2]
    assert math.isnan(summary.means[0]) and math.isnan(summary.mins[0]) and math.isnan(summary.maxs[0])
    assert summary.means[1] == 2.5
    for bad in (0, 3, 2.0, True):
        with pytest.raises(ValueError, match="max_points"): StepSummary(bad)


def test_a_long_run_keeps_a_bounded_number_of_points_with_the_right_min_mean_max():
    plot, oracle = LiveLossPlot(mode="console", max_points=8), StepLosses()
    loop, model = make_loop([plot, oracle])
    loop.fit(model, epochs=5)  # 40 steps into at most 8 points: width 8, 5 points
    steps, losses = list(oracle.losses), list(oracle.losses.values())
    assert plot.steps_per_point == 8 and len(plot.steps) == 5
    expected = brute_force_points(steps, losses, 8, 1)
    assert plot.steps == [s for s, *_ in expected] == [4.5 + 8 * k for k in range(5)]
    assert plot.train_losses == pytest.approx([m for _, m, *_ in expected], rel=1e-6)
    assert plot.train_loss_min == pytest.approx([lo for _, _, lo, _, _ in expected], rel=1e-6)
    assert plot.train_loss_max == pytest.approx([hi for _, _, _, hi, _ in expected], rel=1e-6)
    for mean, h in zip(plot.train_losses, loop.history):  # a point is an epoch here: its mean is the epoch's loss
        assert mean == pytest.approx(h["train_loss"], rel=1e-6)
    per_step = plot.figure().axes[0].lines[0]
    assert list(per_step.get_xdata()) == plot.steps and list(per_step.get_ydata()) == plot.train_losses


def test_nothing_waits_on_the_device_in_more_than_a_bounded_list():
    from trainloop_nb.callbacks.charts import _COLLECT_EVERY
    longest = []

    class WatchPending(Callback):
        order = LiveLossPlot.order + 1
        def batch_end(self, loop): longest.append(len(plot._pending))
    x = torch.randn(3000, 2); y = (x[:, 0] > 0).long()
    model = torch.nn.Linear(2, 2)
    plot = LiveLossPlot(mode="console", max_points=10)
    loop = TrainingLoop(TrainingEpochs((x, y), 1), None, torch.optim.SGD(model.parameters(), lr=0.01),
                        callbacks=[plot, WatchPending()], include_default_callbacks=False)
    loop.fit(model, epochs=1)
    assert max(longest) == _COLLECT_EVERY - 1 and len(plot.steps) <= 10 and plot.steps_per_point == 512
    assert sum(plot.summary.counts) == 3000 and plot.summary.origin == 1
