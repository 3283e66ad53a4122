"""EarlyStopping against Keras' own EarlyStopping: the same monitored values give the same stop and best epochs."""
from __future__ import annotations

import os
import random

os.environ.setdefault("KERAS_BACKEND", "torch")  # Keras 3 on PyTorch: no TensorFlow needed

import pytest
import torch

from trainloop_nb.core import Callback
from trainloop_nb.data import TrainingEpochs, ValidationBatches
from trainloop_nb.loop import TrainingLoop
from trainloop_nb.callbacks.early_stopping import EarlyStopping, Monitor, cpu_copy
from trainloop_nb.callbacks.progress import ProgressPrinter

keras = pytest.importorskip("keras")


class _KerasModelStub:
    "What Keras' EarlyStopping touches on a model: stop_training, and weights only if restoring (we do not)."
    stop_training = False


def keras_early_stopping(values, patience, min_delta, mode):
    "Drive keras.callbacks.EarlyStopping epoch by epoch; returns (epochs run, best epoch, stopped), 1-based like our history."
    callback = keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience, min_delta=min_delta, mode=mode)
    model = _KerasModelStub()
    callback.set_model(model)
    callback.on_train_begin()
    for epoch, value in enumerate(values):
        callback.on_epoch_end(epoch, {"val_loss": value})
        if model.stop_training: return epoch + 1, callback.best_epoch + 1, True
    return len(values), callback.best_epoch + 1, False


class InjectMonitored(Callback):
    "Overwrites this epoch's monitored value in loop.history with a scripted one, before EarlyStopping reads it."
    def __init__(self, name, values):
        self.name, self.values, self.weights = name, values, {}

    def record_added(self, loop):  # where monitors read each record
        loop.history[-1][self.name] = self.values[loop.epoch_index]
        self.weights[loop.epoch_index + 1] = cpu_copy(loop.model.state_dict())


def make_loop(callbacks, validation=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(48, 5, generator=g)
    y = (x[:, 0] > 0).long()
    torch.manual_seed(seed)
    model = torch.nn.Linear(5, 2)
    loop = TrainingLoop(TrainingEpochs((x[:32], y[:32]), batch_size=16),
                        ValidationBatches((x[32:], y[32:]), batch_size=16) if validation else None,
                        torch.optim.SGD(model.parameters(), lr=0.1), metrics=["accuracy"],
                        callbacks=[ProgressPrinter(mode="plain", file=open(os.devnull, "w")), *callbacks])
    return loop, model


def ours(values, patience, min_delta, mode):
    "Run a real TrainingLoop whose monitored values are the scripted ones; returns (epochs run, best epoch) and more."
    name = "valid_loss" if mode == "min" else "valid_accuracy"  # mode="auto" picks min and max from these names
    inject, stopper = InjectMonitored(name, values), EarlyStopping(name, patience=patience, min_delta=min_delta)
    assert stopper.monitor.mode == mode
    loop, model = make_loop([stopper, inject])  # listed first, but its order (50) runs it after the injector
    history = loop.fit(model, epochs=len(values), device="cpu")
    return len(history), stopper, model, inject


def check_against_keras(values, patience, min_delta, mode):
    keras_epochs, keras_best, keras_stopped = keras_early_stopping(values, patience, min_delta, mode)
    epochs, stopper, model, inject = ours(values, patience, min_delta, mode)
    assert (epochs, stopper.best_epoch) == (keras_epochs, keras_best), (values, patience, min_delta, mode)
    assert stopper.stopped_epoch == (epochs if keras_stopped else None)  # a stop at the last epoch counts too
    # restore_best: the model leaves fit with the best epoch's weights, also when it ran to the end.
    best = inject.weights[stopper.best_epoch]
    assert all(torch.equal(v, best[k]) for k, v in model.state_dict().items())
    return keras_stopped


# Values and deltas are multiples of 1/8: exact in float32, in which Keras' ops compare under the torch
# backend, and in float64, in which we do, so both see the same ties and the same min_delta boundaries.
HAND_MADE = [
    ([1.0, 1.0, 1.0, 1.0, 1.0], 0.0),                  # all ties: nothing after the first epoch improves
    ([1.0, 0.875, 0.75, 0.625, 0.5, 0.375], 0.0),      # always improving: runs to the end
    ([1.0, 0.875, 0.75, 0.625, 0.5, 0.375], 0.125),    # gains of exactly min_delta do not count
    ([1.0, 0.875, 0.75, 0.625, 0.5, 0.375], 0.0625),   # gains above min_delta do
    ([1.0, 0.5, 0.5, 0.25, 0.25, 0.25, 0.25, 0.0], 0.0),
    ([2.0, 1.75, 1.875, 1.625, 1.625, 1.5, 1.75, 1.75, 1.75, 1.0], 0.125),
    ([1.0, 2.0, 3.0, 0.0, 0.0, 4.0, 5.0, 6.0, 7.0], 0.0),
    ([0.5, 0.375, 0.5, 0.25, 0.375, 0.375, 0.125, 0.5, 0.5, 0.5, 0.5], 0.125),
]


@pytest.mark.parametrize("values,min_delta", HAND_MADE)
@pytest.mark.parametrize("patience", [0, 1, 3])
@pytest.mark.parametrize("mode", ["min", "max"])
def test_hand_made_sequences_match_keras(values, min_delta, patience, mode):
    check_against_keras(values, patience, min_delta, mode)


def test_random_sequences_with_ties_match_keras():
    rng, stops = random.Random(1234), 0
    for _ in range(120):
        length = rng.randint(1, 12)
        values = [rng.randint(0, 6) / 8 for _ in range(length)]  # few distinct values: many ties
        stops += check_against_keras(values, rng.choice([0, 1, 2, 3, 5]), rng.choice([0.0, 0.125, 0.25]), rng.choice(["min", "max"]))
    assert 30 < stops < 110  # both outcomes are well represented


def test_stop_is_at_epoch_end_and_later_epochs_do_not_start():
    events = []
    loop, model = make_loop([InjectMonitored("valid_loss", [1.0, 1.0, 1.0, 1.0]), EarlyStopping(patience=1),
                             lambda loop, event: events.append((loop.epoch_index, str(event)))])
    history = loop.fit(model, epochs=4, device="cpu")
    assert len(history) == 2 and events[-1] == (1, "fit_end")
    assert [e for e in events if e[1] == "epoch_start"] == [(0, "epoch_start"), (1, "epoch_start")]


def test_stop_training_ends_the_fit_after_every_epoch_end_handler_and_is_reset_by_each_fit():
    ends = []
    class StopOnceAt2(Callback):
        def __init__(self): self.done = False
        def epoch_end(self, loop):
            if loop.epoch_index == 1 and not self.done: loop.stop_training, self.done = True, True
    class Later(Callback):
        order = 200  # after EarlyStopping (50) and Checkpoint (100): still sees the epoch where the fit stops
        def epoch_end(self, loop): ends.append(loop.epoch_index + 1)
    loop, model = make_loop([StopOnceAt2(), Later()])
    assert loop.stop_training is False and len(loop.fit(model, epochs=4, device="cpu")) == 2 and ends == [1, 2]
    assert len(loop.fit(model, epochs=3, device="cpu")) == 3  # a new fit starts with stop_training False
    ends.clear()
    loop, model = make_loop([InjectMonitored("valid_loss", [1.0, 1.0, 1.0, 1.0]), EarlyStopping(patience=1), Later()])
    assert len(loop.fit(model, epochs=4, device="cpu")) == 2 and ends == [1, 2]


def test_restore_best_false_keeps_last_weights():
    inject = InjectMonitored("valid_loss", [1.0, 0.5, 0.75, 0.875])
    stopper = EarlyStopping(patience=5, restore_best=False)
    loop, model = make_loop([inject, stopper])
    loop.fit(model, epochs=4, device="cpu")
    assert stopper.best_epoch == 2 and stopper.best_weights is None
    assert all(torch.equal(v, inject.weights[4][k]) for k, v in model.state_dict().items())


def test_no_restore_after_an_error():
    class Boom(Callback):
        def epoch_start(self, loop):
            if loop.epoch_index == 2: raise RuntimeError("boom")
    inject = InjectMonitored("valid_loss", [1.0, 2.0, 3.0])
    stopper = EarlyStopping(patience=5)
    loop, model = make_loop([inject, stopper, Boom()])
    with pytest.raises(RuntimeError, match="boom"): loop.fit(model, epochs=3, device="cpu")
    assert stopper.best_epoch == 1
    assert all(torch.equal(v, inject.weights[2][k]) for k, v in model.state_dict().items())  # last weights kept


def test_nan_never_improves():
    nan = float("nan")
    epochs, stopper, _, _ = ours([nan, 1.0, nan, nan, 0.5], patience=2, min_delta=0.0, mode="min")
    assert (epochs, stopper.best_epoch, stopper.best) == (4, 2, 1.0)


def test_missing_monitor_lists_available_keys():
    loop, model = make_loop([EarlyStopping("valid_loss")], validation=False)
    with pytest.raises(ValueError, match=r"'valid_loss'.*'train_loss', 'train_accuracy'.*validation data") as info:
        loop.fit(model, epochs=2, device="cpu")
    assert len(loop.history) == 1  # failed at the first epoch_end


@pytest.mark.parametrize("kwargs,match", [
    (dict(monitor=""), "monitor must name"), (dict(monitor=3), "monitor must name"),
    (dict(mode="minimum"), "mode must be one of"), (dict(patience=-1), "patience"), (dict(patience=1.5), "patience"),
    (dict(min_delta=-0.1), "min_delta"), (dict(min_delta=float("nan")), "min_delta"), (dict(min_delta=float("inf")), "min_delta"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match): EarlyStopping(**kwargs)


def test_state_dict_resumes_to_the_same_stop():
    values = [1.0, 0.75, 0.875, 0.5, 0.625, 0.625, 0.625, 0.625]
    whole_epochs, whole, _, _ = ours(values, patience=3, min_delta=0.0, mode="min")
    first = EarlyStopping(patience=3)
    loop, model = make_loop([InjectMonitored("valid_loss", values[:5]), first])
    loop.fit(model, epochs=5, device="cpu")
    state = first.state_dict()
    assert set(state) == {"wait", "best", "best_epoch", "stopped_epoch", "best_weights"}
    assert all(t.device.type == "cpu" for t in state["best_weights"].values())

    class Continue(InjectMonitored):  # the second fit plays epochs 6.. of the same run
        def record_added(self, loop):
            loop.history[-1]["epoch"] = loop.epoch_index + 6
            loop.history[-1][self.name] = self.values[loop.epoch_index + 5]
    second = EarlyStopping(patience=3)
    second.load_state_dict(state)
    loop, model = make_loop([Continue("valid_loss", values), second])
    history = loop.fit(model, epochs=3, device="cpu")
    assert (5 + len(history), second.best_epoch, second.stopped_epoch) == (whole_epochs, whole.best_epoch, whole.stopped_epoch)
    with pytest.raises(ValueError, match="missing"): EarlyStopping().load_state_dict({"wait": 0})


def test_monitor_auto_mode_by_name():
    assert [Monitor(n).mode for n in ("valid_loss", "train_Loss", "valid_perplexity", "valid_accuracy", "valid_mcc")] == \
           ["min", "min", "min", "max", "max"]
    assert Monitor("valid_accuracy", mode="min").mode == "min"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_best_weights_kept_on_cpu_for_a_cuda_model():
    inject = InjectMonitored("valid_loss", [1.0, 0.5, 0.75])
    stopper = EarlyStopping(patience=5)
    loop, model = make_loop([inject, stopper])
    loop.fit(model, epochs=3, device="cuda")
    assert all(t.device.type == "cpu" for t in stopper.best_weights.values())
    assert all(v.device.type == "cuda" and torch.equal(v.cpu(), inject.weights[2][k]) for k, v in model.state_dict().items())
