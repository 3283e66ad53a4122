"""Nothing a fit keeps grows with its number of steps, and the per-batch path takes a batch already on the device as it is.

The long test fits 10**5 steps with every built-in callback and checks, with tracemalloc, that the Python heap
still held after the fit (loop and callbacks alive) exceeds what a 10**3-step fit holds by less than 2 MB:
about 20 bytes a step, a third of what keeping one float per step would cost. What each step costs in time is
measured by benchmarks/step_cost.py, not here (no timing assertions in tests).
"""
from __future__ import annotations

import contextlib
import gc
import os
import tracemalloc

import pytest
import torch
from torch.utils.data import TensorDataset

from trainloop_nb.callbacks.charts import LiveLossPlot
from trainloop_nb.callbacks.inspector import CallbackInspector
from trainloop_nb.callbacks.logging import CSVLogger, TensorBoardLogger
from trainloop_nb.callbacks.progress import ProgressPrinter
from trainloop_nb.callbacks.schedule import LearningRateScheduler, ScheduleSegment, linear
from trainloop_nb.core import Callback
from trainloop_nb.data import TrainingEpochs, ValidationBatches
from trainloop_nb.loop import TrainingLoop

STEPS_PER_EPOCH = 1000  # batch 1 over 1000 samples: a tiny model, so the loop and the callbacks are what runs


def every_callback(folder) -> list:
    "Every built-in callback, in its console mode, writing under `folder`."
    return [ProgressPrinter(mode="terminal"), LiveLossPlot(mode="console"), CSVLogger(os.path.join(folder, "log.csv")),
            TensorBoardLogger(os.path.join(folder, "tensorboard"), batch_metrics=False),
            LearningRateScheduler([ScheduleSegment(linear, start_rate=0.05, end_rate=0.001)]), CallbackInspector()]


def fit(epochs: int, folder) -> TrainingLoop:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(STEPS_PER_EPOCH + 8, 2, generator=g)
    y = (x[:, 0] > x[:, 1]).long()
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 2)
    loop = TrainingLoop(TrainingEpochs(TensorDataset(x[:STEPS_PER_EPOCH], y[:STEPS_PER_EPOCH]), batch_size=1),
                        ValidationBatches(TensorDataset(x[STEPS_PER_EPOCH:], y[STEPS_PER_EPOCH:]), batch_size=2),
                        torch.optim.SGD(model.parameters(), lr=0.05), metrics=["accuracy"],
                        callbacks=every_callback(folder))
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):  # the terminal bars
        loop.fit(model, epochs=epochs, device="cpu")
    return loop


def heap_kept_by_a_fit(epochs: int, folder) -> tuple[int, tracemalloc.Snapshot, TrainingLoop]:
    "Bytes of Python heap allocated during the fit and still held after it, with the loop and its callbacks alive."
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        loop = fit(epochs, folder)
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
        return kept, tracemalloc.take_snapshot(), loop
    finally:
        tracemalloc.stop()


class _NullSummaryWriter:
    "Takes what torch's SummaryWriter takes and writes nothing: serialising 3 scalars a step would be most of the test's time."
    def __init__(self, log_dir=None, **kwargs): pass
    def add_scalar(self, *args, **kwargs): pass
    def flush(self): pass
    def close(self): pass


def test_a_long_fit_with_every_callback_keeps_no_more_than_a_short_one(tmp_path, monkeypatch):
    # TensorBoardLogger runs whole (its per-step buffer, its flushes) into a writer that writes nothing; torch's own
    # SummaryWriter keeps a bounded queue (max_queue events) and is not what this test is about.
    import torch.utils.tensorboard
    monkeypatch.setattr(torch.utils.tensorboard, "SummaryWriter", _NullSummaryWriter)
    fit(1, tmp_path / "warm-up")  # first-call caches (imports, torch's dispatch, fastprogress) are not growth
    short, short_snapshot, short_loop = heap_kept_by_a_fit(1, tmp_path / "short")  # 10**3 steps
    long, long_snapshot, long_loop = heap_kept_by_a_fit(100, tmp_path / "long")  # 10**5 steps
    assert short_loop.step == 10**3 and long_loop.step == 10**5 and len(long_loop.history) == 100
    growth = long - short
    where = "\n".join(str(s) for s in long_snapshot.compare_to(short_snapshot, "lineno")[:8])
    assert growth < 2 * 2**20, (f"a 10**5-step fit keeps {growth / 2**20:.1f} MB more Python heap than a 10**3-step "
                                f"fit ({growth / (10**5 - 10**3):.0f} bytes a step); the biggest differences:\n{where}")


def test_a_batch_on_the_device_is_taken_as_it_is_and_others_are_moved():
    seen = []

    class Batches(Callback):
        def batch_start(self, loop): seen.append((loop.last_step_input, loop.last_step_target))
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    model = torch.nn.Linear(3, 2)
    batches = [(x[:4], y[:4]), [x[4:], y[4:]]]
    loop = TrainingLoop(batches, None, torch.optim.SGD(model.parameters(), lr=0.1), callbacks=[Batches()],
                        include_default_callbacks=False)
    loop.fit(model, epochs=1, device="cpu")
    assert all(a is b[0] and t is b[1] for (a, t), b in zip(seen, batches))  # no copy, no new tensor object

    class DictModel(torch.nn.Module):  # a nested input still goes through to_device
        def __init__(self): super().__init__(); self.linear = torch.nn.Linear(3, 2)
        def forward(self, batch): return self.linear(batch["x"])
    seen.clear()
    model = DictModel()
    loop = TrainingLoop([({"x": x}, y)], None, torch.optim.SGD(model.parameters(), lr=0.1), callbacks=[Batches()],
                        include_default_callbacks=False)
    loop.fit(model, epochs=1, device="cpu")
    (inputs, target), = seen
    assert isinstance(inputs, dict) and inputs["x"] is x and target is y


@pytest.mark.parametrize("use_tensors", [True, False])
def test_an_epoch_makes_its_batches_one_at_a_time(use_tensors):
    "Starting an epoch of a million batches allocates next to nothing: no index tensor or list per batch made ahead."
    samples = 10**6
    x, y = torch.zeros(samples, 1), torch.zeros(samples, dtype=torch.int64)
    dataset = (x, y) if use_tensors else _Samples(samples)
    epochs = TrainingEpochs(dataset, batch_size=1)
    tracemalloc.start()
    try:
        batches = iter(epochs)
        first = next(batches)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(first[0]) == 1 and peak < 2**20, f"starting an epoch peaked at {peak / 2**20:.1f} MB of Python heap"


class _Samples(torch.utils.data.Dataset):
    "A map-style dataset of zeros (the DataLoader path)."
    def __init__(self, n): self.n = n
    def __len__(self): return self.n
    def __getitem__(self, i): return torch.zeros(1), 0
