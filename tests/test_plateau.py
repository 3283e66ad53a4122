"""ReduceLROnPlateau: the rates of Keras's own callback over the same values, every parameter group scaled, composed with
a LearningRateScheduler (it scales what the schedule sets), and a run stopped and resumed bitwise."""
from __future__ import annotations

import copy
import itertools
import os
import types

os.environ.setdefault("KERAS_BACKEND", "torch")  # Keras 3 on PyTorch: no TensorFlow needed

import pytest
import torch

from trainloop_nb.callbacks.checkpoint import Checkpoint
from trainloop_nb.callbacks.plateau import ReduceLROnPlateau
from trainloop_nb.callbacks.schedule import LearningRateScheduler, ScheduleSegment, cosine
from trainloop_nb.core import Callback, Event
from trainloop_nb.data import TrainingEpochs, ValidationBatches
from trainloop_nb.loop import TrainingLoop

keras = pytest.importorskip("keras")
pytestmark = [pytest.mark.filterwarnings("ignore:.*holds the state of a callback Checkpoint:UserWarning"),
              pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning")]


def keras_rates(values, lr, **settings):
    "Keras's ReduceLROnPlateau driven epoch by epoch: the optimizer's rate after each epoch."
    callback = keras.callbacks.ReduceLROnPlateau(monitor="val_loss", **settings)
    model = types.SimpleNamespace(optimizer=keras.optimizers.SGD(learning_rate=lr))
    callback.set_model(model)
    callback.on_train_begin()
    rates = []
    for epoch, value in enumerate(values):
        callback.on_epoch_end(epoch, {"val_loss": value})
        rates.append(float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)))
    return rates


def our_rates(values, lrs, **settings):
    "Ours driven through its callback methods with a stand-in loop (history and optimizer): each group's rate per record."
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in lrs]
    loop = types.SimpleNamespace(history=[], phase=None,
                                 optimizer=torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, lrs)]))
    callback = ReduceLROnPlateau(monitor="valid_loss", **settings)
    callback.fit_start(loop)
    rates = []
    for epoch, value in enumerate(values):
        loop.history.append({"epoch": epoch + 1, "valid_loss": value})
        callback.record_added(loop)
        rates.append([group["lr"] for group in loop.optimizer.param_groups])
    return rates


# Values and deltas are multiples of 1/8: exact in float32, in which Keras compares under the torch backend, and
# in float64, in which we do, so both see the same ties and min_delta boundaries.
SEQUENCES = [
    [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],                                         # one long plateau
    [2.0, 1.75, 1.875, 1.625, 1.625, 1.5, 1.75, 1.75, 1.75, 1.0, 1.0, 1.0, 1.0, 1.0],  # plateaus between gains
    [1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0, 0.0],                      # gains of exactly 0.125
    [0.5, 0.375, 0.5, 0.25, 0.375, 0.375, 0.125, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5],
    [1.0, 2.0, 3.0, 0.0, 0.0, 4.0, 5.0, 6.0, 7.0, 7.0, 7.0, 7.0, 7.0],
]
SETTINGS = [dict(patience=p, cooldown=c, min_delta=d, min_lr=m, factor=f, mode=mode)
            for p, c, d, m, f, mode in itertools.product([0, 1, 3], [0, 2], [0.0, 0.125], [0.0, 0.05], [0.5, 0.1],
                                                         ["min", "max"])]


@pytest.mark.parametrize("values", SEQUENCES)
def test_rates_match_keras(values):
    for settings in SETTINGS:
        expected = keras_rates(values, 1.0, **settings)
        ours = our_rates(values, [1.0, 0.25], **settings)  # a second group at a quarter of the first's rate
        reductions = 0
        for epoch, (keras_rate, (first, second)) in enumerate(zip(expected, ours)):
            where = f"{settings}, {values}, after record {epoch + 1}"
            assert first == pytest.approx(keras_rate, rel=1e-6), where  # Keras keeps its rate in float32
            reductions += epoch > 0 and keras_rate < expected[epoch - 1] or epoch == 0 and keras_rate < 1.0
            # the same reductions, each floored at min_lr on its own
            assert second == pytest.approx(max(0.25 * settings["factor"] ** reductions, settings["min_lr"]), rel=1e-9), where


# --- in a fit ----------------------------------------------------------------------------------------------------------
class Monitored(Callback):
    "Writes a scripted valid_loss into each epoch's record, before ReduceLROnPlateau reads it (order 0 < 1)."
    def __init__(self, values): self.values = values
    def record_added(self, loop): loop.history[-1]["valid_loss"] = self.values[loop.epoch_index]


class RatesUsed(Callback):
    "The rates each optimizer step uses: at update_start, after every batch_start handler."
    def fit_start(self, loop):
        if loop.step == 0: self.used = {}
    def update_start(self, loop): self.used[loop.step] = [float(group["lr"]) for group in loop.optimizer.param_groups]


PLATEAUS = [1.0, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.25, 0.25, 0.125]


def reduced_by(epoch: int) -> float:
    "With patience=2: the factor in force in epoch `epoch` (0-based), after the reductions at records 4, 7 and 9."
    return 0.5 ** sum(epoch >= e for e in (4, 7, 9))


def make_loop(callbacks, groups=(0.1, 0.01), batches=3, optimizer="sgd", tensor_rates=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16 * batches + 8, 4, generator=g)
    y = (x[:, 0] > 0).long()
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(8, 2))
    rate = (lambda r: torch.tensor(r)) if tensor_rates else float
    param_groups = [{"params": model[0].parameters(), "lr": rate(groups[0])},
                    {"params": model[3].parameters(), "lr": rate(groups[1])}]
    opt = torch.optim.SGD(param_groups, momentum=0.9) if optimizer == "sgd" else torch.optim.Adam(param_groups)
    loop = TrainingLoop(TrainingEpochs((x[:16 * batches], y[:16 * batches]), batch_size=16, seed=3),
                        ValidationBatches((x[16 * batches:], y[16 * batches:]), 8), opt, callbacks=callbacks,
                        include_default_callbacks=False)
    return loop, model


def test_without_a_schedule_each_reduction_changes_the_rates_once():
    rates, plateau = RatesUsed(), ReduceLROnPlateau(patience=2, factor=0.5)
    loop, model = make_loop([Monitored(PLATEAUS), plateau, rates])
    loop.fit(model, epochs=10, device="cpu")
    # Every group halved at each reduction, their ratio kept; not compounded at every step
    for step, (first, second) in rates.used.items():
        factor = reduced_by(step // 3)  # 3 steps an epoch
        assert (first, second) == (pytest.approx(0.1 * factor), pytest.approx(0.01 * factor)), step
    assert plateau.scales == [0.125, 0.125] and loop.optimizer.param_groups[1]["lr"] == pytest.approx(0.00125)


@pytest.mark.parametrize("tensor_rates", [False, True])
@pytest.mark.parametrize("min_lr", [0.0, 0.004])
def test_with_a_schedule_it_scales_what_the_schedule_sets(tensor_rates, min_lr):
    rates = RatesUsed()
    schedule = LearningRateScheduler([ScheduleSegment(cosine, 0.1, 0.001)])
    plateau = ReduceLROnPlateau(patience=2, factor=0.5, min_lr=min_lr)
    loop, model = make_loop([schedule, Monitored(PLATEAUS), plateau, rates], tensor_rates=tensor_rates)
    loop.fit(model, epochs=10, device="cpu")
    assert len(rates.used) == 30
    for step, used in rates.used.items():
        factor = reduced_by(step // 3)
        for rate, ratio in zip(used, (1.0, 0.1)):
            scheduled = schedule.rates[step] * ratio
            expected = max(scheduled * factor, min(scheduled, min_lr))  # reductions stop at min_lr, the schedule need not
            assert rate == pytest.approx(expected, rel=1e-6), (step, used)


@pytest.mark.parametrize("with_schedule", [True, False])
def test_a_stopped_run_resumes_bitwise(tmp_path, with_schedule):
    def run(extra=()):
        schedule = [LearningRateScheduler([ScheduleSegment(cosine, 0.1, 0.001)])] if with_schedule else []
        plateau, rates = ReduceLROnPlateau(patience=2, factor=0.5, cooldown=1), RatesUsed()
        loop, model = make_loop([*schedule, Monitored(PLATEAUS), plateau, rates, *extra], optimizer="adam")
        return loop, model, plateau, rates

    loop, model, plateau, rates = run()
    loop.fit(model, epochs=10, device="cpu")
    reference = (copy.deepcopy(model.state_dict()), plateau.state_dict(), rates.used)

    class StopAt(Callback):
        order = 50  # after ReduceLROnPlateau (1) acted at record_added, before Checkpoint's (100)
        def __init__(self, event, n): self.event, self.n, self.count = event, n, 0
        def epoch_end(self, loop): self._maybe(Event.epoch_end)
        def batch_end(self, loop): self._maybe(Event.batch_end)
        def _maybe(self, event):
            if event is not self.event: return
            self.count += 1
            if self.count == self.n: raise KeyboardInterrupt

    def same(model, plateau, rates):
        assert all(torch.equal(v, reference[0][k]) for k, v in model.state_dict().items())
        assert plateau.state_dict() == reference[1] and rates.used == reference[2]

    # at a reduction (record 4), in the cooldown after it; inside epoch 7's training (4 batch_ends an epoch)
    points = [(Event.epoch_end, 4), (Event.epoch_end, 5), (Event.batch_end, 6 * 4 + 2)]
    for i, (event, n) in enumerate(points):
        loop, model, plateau, rates = run([StopAt(event, n), Checkpoint(tmp_path / str(i))])
        with pytest.raises(KeyboardInterrupt): loop.fit(model, epochs=10, device="cpu")
        used_before = rates.used
        loop, model, plateau, rates = run([Checkpoint(tmp_path / str(i))])
        rates.used = dict(used_before)  # the steps the stopped run made; the resumed run adds the rest
        loop.fit(model, epochs=10, device="cpu", resume_from=tmp_path / str(i))
        same(model, plateau, rates)
        loop, model, plateau, rates = run([StopAt(event, n)])  # in memory
        with pytest.raises(KeyboardInterrupt): loop.fit(model, epochs=10, device="cpu")
        loop.resume()
        same(model, plateau, rates)


def test_check_is_the_decision_and_returns_whether_it_reduced():
    plateau = ReduceLROnPlateau(patience=1, factor=0.5, min_delta=0.0)
    loop = types.SimpleNamespace(history=[], phase=None,
                                 optimizer=torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
    plateau.fit_start(loop)
    decisions = []
    for value in (1.0, 0.5, 0.5, 0.5, 0.25):
        loop.history.append({"valid_loss": value})
        decisions.append(plateau.check(loop))
    assert decisions == [False, False, True, True, False] and loop.optimizer.param_groups[0]["lr"] == 0.025


def test_bad_arguments_and_states_are_refused_with_what_to_do():
    with pytest.raises(ValueError, match="factor must be a number between 0 and 1"): ReduceLROnPlateau(factor=1.0)
    with pytest.raises(ValueError, match="patience must be a whole number"): ReduceLROnPlateau(patience=-1)
    with pytest.raises(ValueError, match="cooldown must be a whole number"): ReduceLROnPlateau(cooldown=1.5)
    with pytest.raises(ValueError, match="min_lr must be a number >= 0, or a list"): ReduceLROnPlateau(min_lr=-1)
    with pytest.raises(ValueError, match="missing"): ReduceLROnPlateau().load_state_dict({"best": 1.0})
    loop, model = make_loop([ReduceLROnPlateau(min_lr=[0.0, 0.0, 0.0])])
    with pytest.raises(ValueError, match="min_lr gives 3 rates, but the optimizer has 2 parameter groups"):
        loop.fit(model, epochs=1, device="cpu")
    loop, model = make_loop([ReduceLROnPlateau("val_loss")])
    with pytest.raises(ValueError, match="Did you mean 'valid_loss'"): loop.fit(model, epochs=1, device="cpu")
