"""Runs counted in steps (issue 22): max_steps, validate_every with a record per validation, monitors acting on every
record, exact resume inside a validation that runs inside an epoch, batch limits, fast_dev_run, schedules over max_steps.
"""
from __future__ import annotations

import copy
import io

import pytest
import torch

from trainloop_nb.callbacks.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from trainloop_nb.callbacks.early_stopping import EarlyStopping
from trainloop_nb.callbacks.logging import CSVLogger, TensorBoardLogger
from trainloop_nb.callbacks.progress import ProgressPrinter
from trainloop_nb.callbacks.schedule import LearningRateScheduler, OneCycle, ScheduleSegment, linear, make_schedule
from trainloop_nb.core import Callback, Event
from trainloop_nb.loop import TrainingLoop

from test_resume import (EPOCHS, InterruptAt, build, interruption_points, same_optimizer, same_weights,
                         tensorboard_scalars, without_time)

torch.set_num_threads(1)


def linear_run(batches=12, seed=0, validation=True, **loop_options):
    "12 fixed batches of 4 (no shuffling), a linear model, SGD: what a hand loop can repeat."
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(batches * 4, 6, generator=g), torch.randint(0, 3, (batches * 4,), generator=g)
    train = [(x[i:i + 4], y[i:i + 4]) for i in range(0, batches * 4, 4)]
    valid = [(x[:8], y[:8]), (x[8:12], y[8:12])] if validation else None
    torch.manual_seed(seed)
    model = torch.nn.Linear(6, 3)
    loop = TrainingLoop(train, valid, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                        include_default_callbacks=False, **loop_options)
    return loop, model, train


class Records(Callback):
    "The step of each record as record_added fires, and each training batch's loss."
    def __init__(self): self.steps, self.losses = [], []
    def record_added(self, loop): self.steps.append(loop.history[-1].get("step"))
    def batch_end(self, loop):
        if loop.phase == "training": self.losses.append(loop.last_step_loss.item())


def test_max_steps_stops_inside_an_epoch_with_the_weights_of_a_hand_loop():
    loop, model, train = linear_run()
    history = loop.fit(model, max_steps=17)  # epochs=None: as many as it takes
    assert loop.step == 17 and [r["epoch"] for r in history] == [1, 2] and loop.epoch_count == 2
    torch.manual_seed(0)
    hand_model = torch.nn.Linear(6, 3)
    opt = torch.optim.SGD(hand_model.parameters(), lr=0.1, momentum=0.9)
    for step in range(17):
        x, y = train[step % 12]
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(hand_model(x), y).backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), hand_model.state_dict().values()))


def test_max_steps_with_epochs_ends_at_whichever_comes_first():
    loop, model, _ = linear_run()
    loop.fit(model, epochs=1, max_steps=30)
    assert loop.step == 12
    loop.fit(model, epochs=5, max_steps=30)
    assert loop.step == 30 and len(loop.history) == 3
    with pytest.raises(ValueError, match="max_steps must be None or a whole number"): loop.fit(model, max_steps=0)


def test_validate_every_validates_at_the_designs_steps_with_the_training_metrics_since_the_previous_record():
    records = Records()
    loop, model, _ = linear_run(callbacks=[records])
    history = loop.fit(model, epochs=2, validate_every=5)
    assert [r["step"] for r in history] == records.steps == [5, 10, 12, 15, 20, 24]
    assert [r["epoch"] for r in history] == [1, 1, 1, 2, 2, 2]
    assert all("valid_loss" in r and "train_loss" in r for r in history)
    bounds = [0, 5, 10, 12, 15, 20, 24]  # each record's training loss: the mean over its own batches (same sizes)
    for record, start, end in zip(history, bounds, bounds[1:]):
        assert record["train_loss"] == pytest.approx(sum(records.losses[start:end]) / (end - start), rel=1e-6)


def test_an_epoch_run_fires_record_added_once_per_epoch_and_has_no_step_key():
    records = Records()
    loop, model, _ = linear_run(callbacks=[records])
    history = loop.fit(model, epochs=3)
    assert records.steps == [None, None, None] and all("step" not in r for r in history)


class Unsized:
    "Batches without len(): the loop cannot know an epoch's last batch before it comes."
    def __init__(self, batches): self.batches = batches
    def __iter__(self): return iter(self.batches)


def test_data_without_len_validates_once_where_a_step_and_the_epoch_end_coincide():
    loop, model, train = linear_run()
    loop.training = Unsized(train)
    history = loop.fit(model, max_steps=30, validate_every=6)
    assert [r["step"] for r in history] == [6, 12, 18, 24, 30] and [r["epoch"] for r in history] == [1, 1, 2, 2, 3]
    assert loop.epoch_count == 3


def test_early_stopping_acts_on_each_record_and_stops_inside_the_epoch():
    # "step" only grows, so with mode="min" it never improves after the first record: stop after patience more
    loop, model, _ = linear_run(callbacks=[EarlyStopping("step", mode="min", patience=2, restore_best=False)])
    history = loop.fit(model, epochs=3, validate_every=3)
    assert [r["step"] for r in history] == [3, 6, 9] and loop.step == 9  # epoch 1 has 12 steps


def test_checkpoint_writes_best_pt_at_the_best_record_inside_an_epoch(tmp_path):
    loop, model, _ = linear_run(callbacks=[Checkpoint(tmp_path, every_epochs=None, monitor="valid_loss")])
    history = loop.fit(model, epochs=2, validate_every=5)
    best = min(history, key=lambda r: r["valid_loss"])
    state = load_checkpoint(tmp_path / "best.pt")
    assert state["step"] == best["step"] and without_time(state["history"])[-1] == without_time([best])[0]


def test_table_rows_and_tensorboard_values_are_per_record_at_its_step(tmp_path):
    out = io.StringIO()
    loop, model, _ = linear_run(callbacks=[ProgressPrinter(mode="plain", file=out),
                                           TensorBoardLogger(tmp_path / "tb", batch_metrics=False)])
    history = loop.fit(model, epochs=2, validate_every=5)
    lines = out.getvalue().splitlines()
    assert lines[0].split()[:2] == ["epoch", "step"] and len(lines) == 1 + len(history)
    assert [line.split()[1] for line in lines[1:]] == ["5", "10", "12", "15", "20", "24"]
    run = next(p for p in (tmp_path / "tb").iterdir() if p.is_dir())
    assert [s for s, _ in tensorboard_scalars(run, "epoch_loss", "validation")] == [5, 10, 12, 15, 20, 24]


def test_limit_batches_caps_each_phase():
    seen = {"training": 0, "validation": 0}
    def count(loop, event):
        if event == Event.batch_end: seen[loop.phase.value] += 1
    loop, model, _ = linear_run(callbacks=[count])
    loop.fit(model, epochs=2, limit_train_batches=3, limit_valid_batches=1)
    assert seen == {"training": 6, "validation": 2} and loop.step == 6


def test_fast_dev_run_runs_one_batch_of_each_phase_writes_no_file_and_says_so(tmp_path, capsys):
    pytest.importorskip("mlflow")
    from trainloop_nb.callbacks.tracking import MLflowLogger
    callbacks = [Checkpoint(tmp_path / "checkpoints"), CSVLogger(tmp_path / "log.csv"),
                 TensorBoardLogger(tmp_path / "tb"), MLflowLogger(f"sqlite:///{tmp_path}/mlflow.db")]
    loop, model, _ = linear_run(callbacks=callbacks)
    history = loop.fit(model, epochs=5, fast_dev_run=True)
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 1 and printed[0].startswith("fast_dev_run:") and "Checkpoint, CSVLogger" in printed[0]
    assert loop.step == 1 and len(history) == 1 and "valid_loss" in history[0]
    assert list(tmp_path.iterdir()) == []


def test_a_resume_with_other_step_options_is_refused(tmp_path):
    loop, model, _ = linear_run(callbacks=[Checkpoint(tmp_path, every_steps=5)])
    loop.fit(model, max_steps=10, validate_every=5)
    loop, model, _ = linear_run()
    with pytest.raises(CheckpointError, match="max_steps: the run used 10, this fit asks for 20"):
        loop.fit(model, max_steps=20, validate_every=5, resume_from=tmp_path)


# --- exact resume inside a validation inside an epoch: dropout, Adam, shuffled data, a schedule, a CSV log --------

@pytest.fixture(scope="module")
def reference_by_steps(tmp_path_factory):
    directory = tmp_path_factory.mktemp("reference")
    seen = []
    loop, model = build(directory, [lambda loop, event: seen.append(event)])
    history = loop.fit(model, epochs=EPOCHS, validate_every=2)  # 3 steps an epoch: records at steps 2, 3, 4, 6
    assert [r["step"] for r in history] == [2, 3, 4, 6]
    return {"weights": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(loop.optimizer.state_dict()),
            "history": without_time(history), "csv": (directory / "log.csv").read_text(), "events": seen}


def check_same(reference, model, loop, history, directory):
    assert same_weights(model, reference["weights"])
    assert same_optimizer(loop.optimizer.state_dict(), reference["optimizer"])
    assert without_time(history) == reference["history"]
    assert (directory / "log.csv").read_text() == reference["csv"]


def test_stopped_at_every_event_of_a_run_validating_every_2_steps_resumes_bitwise(reference_by_steps, tmp_path):
    points = interruption_points(reference_by_steps["events"])
    assert (Event.validation_start, 4) in points  # the second validation inside an epoch, and more
    for i, (event, n) in enumerate(points):
        where = f"KeyboardInterrupt at {event.value} #{n}"
        directory = tmp_path / f"file{i}"
        loop, model = build(directory, [InterruptAt(event, n), Checkpoint(directory / "checkpoints")])
        with pytest.raises(KeyboardInterrupt): loop.fit(model, epochs=EPOCHS, validate_every=2)
        loop, model = build(directory, [Checkpoint(directory / "checkpoints")])
        torch.manual_seed(1234)  # a new process has its own seed: the checkpoint's generators replace it
        history = loop.fit(model, epochs=EPOCHS, validate_every=2, resume_from=directory / "checkpoints")
        try: check_same(reference_by_steps, model, loop, history, directory)
        except AssertionError as e: raise AssertionError(f"{where}, resumed from the checkpoint") from e
        directory = tmp_path / f"memory{i}"
        loop, model = build(directory, [InterruptAt(event, n)])
        with pytest.raises(KeyboardInterrupt): loop.fit(model, epochs=EPOCHS, validate_every=2)
        torch.manual_seed(1234)
        history = loop.resume()
        try: check_same(reference_by_steps, model, loop, history, directory)
        except AssertionError as e: raise AssertionError(f"{where}, resumed in memory") from e


# --- schedules, fit_one_cycle and lr_find over max_steps ----------------------------------------------------------

class Rates(Callback):
    order = 10  # after the schedule (order 0) has set the step's rate
    def __init__(self): self.rates = []
    def batch_start(self, loop):
        if loop.phase == "training": self.rates.append(loop.learning_rate)


def test_a_schedule_spans_max_steps():
    rates = Rates()
    segments = [ScheduleSegment(linear, 0.1, 0.0)]
    loop, model, _ = linear_run(callbacks=[LearningRateScheduler(segments), rates])
    loop.fit(model, max_steps=30)  # 12 batches an epoch: 2.5 epochs
    assert rates.rates == make_schedule(segments)(30).tolist()


def test_fit_one_cycle_spans_max_steps():
    rates = Rates()
    loop, model, _ = linear_run(callbacks=[rates])
    loop.fit_one_cycle(model, None, 0.1, max_steps=30)
    assert rates.rates == OneCycle(0.1)(30).tolist()  # the cycle spans the run: 30 steps, 2.5 epochs


def test_lr_find_runs_its_own_number_of_steps_whatever_the_run_length_options():
    loop, model, _ = linear_run(batches=3)
    result = loop.lr_find(model, num_steps=10, end_lr=1e-2, max_steps=4, validate_every=2)
    assert len(result.rates) == 10


def test_reduce_lr_on_plateau_acts_on_each_record_inside_the_epoch():
    from trainloop_nb.callbacks.plateau import ReduceLROnPlateau
    # "step" only grows: with mode="min" each record after the first is a plateau; patience=1 reduces at each
    loop, model, _ = linear_run(callbacks=[ReduceLROnPlateau("step", mode="min", factor=0.5, patience=1)])
    loop.fit(model, epochs=1, validate_every=3)  # records at steps 3, 6, 9, 12: three reductions, all in epoch 1
    assert loop.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 3)


def test_checkpoint_writes_a_model_whose_non_persistent_mask_holds_minus_infinity(tmp_path):
    class Masked(torch.nn.Linear):  # as a causal attention mask: -inf where a token may not look
        def __init__(self):
            super().__init__(6, 3)
            self.register_buffer("mask", torch.full((2, 2), float("-inf")).triu(1), persistent=False)
    loop, _, _ = linear_run()
    torch.manual_seed(0)
    model = Masked()
    loop.optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loop.callbacks = loop.user_callbacks = [Checkpoint(tmp_path, every_steps=4)]
    loop.fit(model, max_steps=8)
    assert sorted(p.name for p in tmp_path.glob("step-*.pt")) == ["step-00000004.pt", "step-00000008.pt"]
