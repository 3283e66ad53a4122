"""TrainingLoop: event sequences (normal and every cancel action at every event in its scope),
errors, bad input, and the absence of host synchronisation in the per-batch path."""
import math

import pytest
import torch

from trainloop_nb import core
from trainloop_nb.core import (Callback, CancelBatch, CancelEpoch, CancelFit, CancelTraining, CancelValidation)
from trainloop_nb.data import TrainingEpochs, ValidationBatches
from trainloop_nb.loop import TrainingLoop

from toy_runs import display_modules_loaded_by, toy_loop
from host_reads import count_host_reads

EPOCHS, TRAIN_BATCHES, VALID_BATCHES = 2, 3, 2


def make_loop(callbacks=(), validation=True, defaults=False, train_batches=TRAIN_BATCHES, metrics=()):
    return toy_loop(callbacks, train=8 * train_batches, valid=12, features=4, classes=3, batch_size=8,
                    valid_batch_size=6, metrics=metrics, validation=validation, printer=False, defaults=defaults)


class Recorder(Callback):
    """Records every event as (event, epoch_index, phase, batch_index) and raises `cancel` once at `at`."""
    order = -100  # sees each event first, so it records the event it raises at

    def __init__(self, cancel=None, at=None):
        self.cancel, self.at, self.events, self.steps_at_raise = cancel, at, [], None
    def _record(self, loop, event):
        phase = loop.phase if event not in ("fit_start", "fit_end", "epoch_start", "record_added", "epoch_end") else None
        batch = loop.batch_index if event in ("batch_start", "update_start", "inference_prediction_end", "batch_end") else None
        key = (event, loop.epoch_index, phase, batch)
        self.events.append(key)
        if self.cancel is not None and key == self.at:
            cancel, self.cancel = self.cancel, None
            raise cancel()

for _event in core.Event:
    setattr(Recorder, _event.value, (lambda e: lambda self, loop: self._record(loop, e))(_event.value))


# --- the oracle: the design contract's semantics, written as a walk over the nested scopes ---------
def expected_events(epochs, train_batches, valid_batches, cancel=None, at=None):
    out, pending, steps = [], [cancel], [0]

    def emit(key):
        out.append(key)
        if pending[0] is not None and key == at:
            exc, pending[0] = pending[0], None
            raise exc()

    def scope(start, body, end, exc):
        try:
            if start: emit(start)
            body()
        except exc: pass
        try: emit(end)
        except exc: pass

    def batch(epoch, phase, b):
        def body():
            emit(("batch_start", epoch, phase, b))
            if phase == "training":
                emit(("update_start", epoch, phase, b)); steps[0] += 1
            else:
                emit(("inference_prediction_end", epoch, phase, b))
        scope(None, body, ("batch_end", epoch, phase, b), CancelBatch)

    def phase(epoch, name, n, start, end, exc):
        scope((start, epoch, name, None), lambda: [batch(epoch, name, b) for b in range(n)], (end, epoch, name, None), exc)

    def epoch(e):
        def body():
            phase(e, "training", train_batches, "training_start", "training_end", CancelTraining)
            phase(e, "validation", valid_batches, "validation_start", "validation_end", CancelValidation)
        try:
            emit(("epoch_start", e, None, None))
            body()
        except CancelEpoch: pass
        try: emit(("record_added", e, None, None))  # the epoch's record is appended, whatever was cancelled
        except (CancelBatch, CancelTraining, CancelValidation, CancelEpoch): pass  # nothing of theirs is left
        try: emit(("epoch_end", e, None, None))
        except CancelEpoch: pass

    scope(("fit_start", 0, None, None), lambda: [epoch(e) for e in range(epochs)], ("fit_end", None, None, None), CancelFit)
    return out, steps[0]


def normalise(events, epochs):
    # the oracle does not track which epoch fit_end comes after
    return [(e, ep if e != "fit_end" else None, ph, b) for e, ep, ph, b in events]


def test_full_fit_event_sequence_is_exact():
    rec = Recorder()
    loop, model = make_loop([rec])
    loop.fit(model, epochs=EPOCHS)
    want, steps = expected_events(EPOCHS, TRAIN_BATCHES, VALID_BATCHES)
    assert normalise(rec.events, EPOCHS) == normalise(want, EPOCHS)
    assert loop.step == steps == EPOCHS * TRAIN_BATCHES
    # and literally, for the first epoch's training phase
    names = [e for e, *_ in rec.events]
    assert names[:6] == ["fit_start", "epoch_start", "training_start", "batch_start", "update_start", "batch_end"]
    assert names[-4:] == ["validation_end", "record_added", "epoch_end", "fit_end"]


SCOPES = {
    CancelBatch: [("batch_start", "training"), ("update_start", "training"), ("batch_end", "training"),
                  ("batch_start", "validation"), ("inference_prediction_end", "validation"), ("batch_end", "validation")],
    CancelTraining: [("training_start", "training"), ("batch_start", "training"), ("update_start", "training"),
                     ("batch_end", "training"), ("training_end", "training")],
    CancelValidation: [("validation_start", "validation"), ("batch_start", "validation"),
                       ("inference_prediction_end", "validation"), ("batch_end", "validation"), ("validation_end", "validation")],
    CancelEpoch: [("epoch_start", None), ("training_start", "training"), ("batch_start", "training"),
                  ("update_start", "training"), ("batch_end", "training"), ("training_end", "training"),
                  ("validation_start", "validation"), ("batch_start", "validation"),
                  ("inference_prediction_end", "validation"), ("batch_end", "validation"),
                  ("validation_end", "validation"), ("epoch_end", None)],
}
SCOPES[CancelFit] = [("fit_start", None)] + SCOPES[CancelEpoch] + [("fit_end", None)]

CASES = [(cancel, event, phase, epoch, batch)
         for cancel, points in SCOPES.items() for event, phase in points
         for epoch in (0, 1) for batch in ((1,) if event in ("batch_start", "update_start", "batch_end",
                                                              "inference_prediction_end") else (None,))
         if not (event in ("fit_start", "fit_end") and epoch == 1)]


@pytest.mark.parametrize("cancel,event,phase,epoch,batch", CASES,
                         ids=[f"{c.__name__}-{e}-{p}-e{ep}" for c, e, p, ep, _ in CASES])
def test_cancel_sequences_match_the_contract(cancel, event, phase, epoch, batch):
    if event == "fit_end": epoch = EPOCHS - 1
    at = (event, epoch, phase, batch)
    rec = Recorder(cancel, at)
    loop, model = make_loop([rec])
    loop.fit(model, epochs=EPOCHS)
    assert rec.cancel is None, f"the test never reached {at}"
    want, steps = expected_events(EPOCHS, TRAIN_BATCHES, VALID_BATCHES, cancel, at)
    assert normalise(rec.events, EPOCHS) == normalise(want, EPOCHS)
    assert loop.step == steps
    assert loop.exception is None


def test_cancelled_training_batch_makes_no_optimizer_step():
    class CancelAll(Callback):
        def update_start(self, loop): raise CancelBatch()
    loop, model = make_loop([CancelAll()])
    before = [p.detach().clone() for p in model.parameters()]
    loop.fit(model, epochs=1)
    assert loop.step == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_cancel_outside_its_scope_is_an_error():
    class Misplaced(Callback):
        def epoch_start(self, loop): raise CancelBatch()
    loop, model = make_loop([Misplaced()])
    with pytest.raises(CancelBatch):
        loop.fit(model, epochs=1)


# --- errors: fit_end always fires, the error comes back unchanged and names its origin --------------
@pytest.mark.parametrize("error_type", [RuntimeError, KeyboardInterrupt])
def test_fit_end_fires_after_an_error_and_the_error_is_reraised(error_type):
    raised = error_type("stop here")
    class Boom(Callback):
        def batch_end(self, loop):
            if loop.step == 2: raise raised
    seen = []
    def at_fit_end(loop, event):
        if event == "fit_end": seen.append(loop.exception)
    loop, model = make_loop([Boom(), at_fit_end])
    with pytest.raises(error_type) as info:
        loop.fit(model, epochs=EPOCHS)
    assert info.value is raised and seen == [raised]
    assert info.traceback[-1].name == "batch_end"  # traceback still ends where it was raised
    if error_type is RuntimeError:
        assert info.value.__notes__ == ["raised in callback Boom at event batch_end",
                                        "in epoch 1, training batch 2 (after step 2)"]


def test_error_in_function_callback_is_named():
    def picky(loop, event):
        if event == "update_start": raise ValueError("bad")
    loop, model = make_loop([picky])
    with pytest.raises(ValueError) as info:
        loop.fit(model, epochs=1)
    assert "raised in callback" in info.value.__notes__[0] and "picky" in info.value.__notes__[0]
    assert "update_start" in info.value.__notes__[0]


def test_error_in_model_keeps_weights_and_fires_fit_end():
    class Bad(torch.nn.Module):
        def __init__(self):
            super().__init__(); self.lin = torch.nn.Linear(4, 3); self.calls = 0
        def forward(self, x):
            self.calls += 1
            if self.calls == 3: raise RuntimeError("forward failed")
            return self.lin(x)
    model = Bad()
    ended = []
    loop, _ = make_loop([lambda loop, e: ended.append(e) if e == "fit_end" else None])
    loop.optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="forward failed"):
        loop.fit(model, epochs=1)
    assert ended == ["fit_end"] and loop.step == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


# --- bad input: clear errors before any training -------------------------------------------------
def fails_before_training(make, match, exc=ValueError):
    events = []
    with pytest.raises(exc, match=match):
        make(lambda loop, e: events.append(e))
    return events


def test_unknown_metric_name():
    with pytest.raises(ValueError, match="unknown metric 'acuracy'.*accuracy"):
        make_loop(metrics=["acuracy"])


def test_epochs_below_one():
    loop, model = make_loop()
    for bad in (0, -1, 1.5, "2"):
        with pytest.raises(ValueError, match="epochs must be a whole number of at least 1"):
            loop.fit(model, epochs=bad)


def test_model_without_parameters():
    loop, _ = make_loop()
    with pytest.raises(ValueError, match="has no parameters"):
        loop.fit(torch.nn.ReLU(), epochs=1)


def test_optimizer_of_another_model():
    loop, _ = make_loop()
    with pytest.raises(ValueError, match="optimizer holds none of this model's parameters"):
        loop.fit(torch.nn.Linear(4, 3), epochs=1)


def test_empty_training_set():
    model = torch.nn.Linear(4, 3)
    events = []
    loop = TrainingLoop([], None, torch.optim.SGD(model.parameters(), lr=0.1), callbacks=[lambda l, e: events.append(e)])
    with pytest.raises(ValueError, match="training data is empty"):
        loop.fit(model, epochs=1)
    assert events == []  # nothing ran


def test_empty_unsized_training_set():
    model = torch.nn.Linear(4, 3)
    loop = TrainingLoop((b for b in []), None, torch.optim.SGD(model.parameters(), lr=0.1), include_default_callbacks=False)
    with pytest.raises(ValueError, match="produced no batches"):
        loop.fit(model, epochs=1)


def test_batch_that_is_not_a_pair():
    model = torch.nn.Linear(4, 3)
    loop = TrainingLoop([torch.zeros(2, 4)], None, torch.optim.SGD(model.parameters(), lr=0.1), include_default_callbacks=False)
    with pytest.raises(TypeError, match=r"pair \(input, target\).*single tensor of shape \(2, 4\)"):
        loop.fit(model, epochs=1)


def test_loss_that_is_not_a_scalar():
    model = torch.nn.Linear(4, 3)
    loop = TrainingLoop([(torch.zeros(2, 4), torch.zeros(2, 3))], None, torch.optim.SGD(model.parameters(), lr=0.1),
                        loss_func=lambda o, t: (o - t) ** 2, include_default_callbacks=False)
    with pytest.raises(ValueError, match=r"scalar tensor, but returned \(2, 3\)"):
        loop.fit(model, epochs=1)


# --- callbacks given to fit, ordering, defaults ---------------------------------------------------
def test_fit_callbacks_apply_to_that_call_only_and_order_sorts_stably():
    calls = []
    class A(Callback):
        def fit_start(self, loop): calls.append("A")
    class B(Callback):
        order = -1
        def fit_start(self, loop): calls.append("B")
    loop, model = make_loop([A()])
    loop.fit(model, epochs=1, callbacks=[B(), lambda l, e: calls.append("f") if e == "fit_start" else None])
    assert calls == ["B", "A", "f"]
    calls.clear()
    loop.fit(model, epochs=1)
    assert calls == ["A"]


def test_default_callbacks_and_history():
    loop, model = make_loop(defaults=True, metrics=["accuracy"])
    names = [type(cb).__name__ for cb in loop.callbacks]
    assert names[:1] == ["ProgressPrinter"]
    history = loop.fit(model, epochs=2)
    assert [set(h) for h in history] == [{"epoch", "train_loss", "train_accuracy", "valid_loss", "valid_accuracy", "time"}] * 2


def test_disabling_a_callback_rebuilds_dispatch():
    seen = []
    class Count(Callback):
        def batch_end(self, loop):
            seen.append(loop.step)
            if loop.step == 2: loop.set_enabled(self, False)
    cb = Count()
    loop, model = make_loop([cb])
    loop.fit(model, epochs=1)
    assert seen == [1, 2] and not loop.is_enabled(cb)


def test_a_callback_switched_on_at_batch_start_sees_that_batch_end():
    "The dispatch table is read at each event: set_enabled counts from the next event, the same batch's included."
    seen = []
    class Late(Callback):
        def batch_end(self, loop): seen.append((loop.phase.value, loop.step))
        def update_start(self, loop): seen.append(("update", loop.step))
    late = Late()
    class SwitchOn(Callback):
        def batch_start(self, loop):
            if loop.phase == "training" and loop.batch_index == 1: loop.set_enabled(late, True)
    loop, model = make_loop([SwitchOn(), late], validation=False)
    loop.set_enabled(late, False)
    loop.fit(model, epochs=1)
    assert seen[:3] == [("update", 1), ("training", 2), ("update", 2)]  # from batch 2 on: its update_start and batch_end


# --- exact metrics through the loop, against scikit-learn --------------------------------------------
def test_loop_metrics_equal_sklearn_over_the_phase():
    from sklearn.metrics import accuracy_score, matthews_corrcoef, top_k_accuracy_score
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(103, 6, generator=g), torch.randint(0, 7, (103,), generator=g)
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 7)
    loop = TrainingLoop(TrainingEpochs((x, y), batch_size=16), ValidationBatches((x, y), batch_size=10),
                        torch.optim.SGD(model.parameters(), lr=0.05), metrics=["accuracy", "top5_accuracy", "mcc", "perplexity"],
                        callbacks=[], include_default_callbacks=True)
    loop.fit(model, epochs=1)
    with torch.no_grad():  # the validation batches of 10: another batch size may round the logits differently
        out = torch.cat([model(xb) for xb in x.split(10)])
    h = loop.history[-1]
    pred = out.argmax(1)
    assert math.isclose(h["valid_accuracy"], accuracy_score(y, pred))
    assert math.isclose(h["valid_top5_accuracy"], top_k_accuracy_score(y, out, k=5, labels=range(7)))
    assert math.isclose(h["valid_mcc"], matthews_corrcoef(y, pred), abs_tol=1e-12)
    ce = torch.nn.functional.cross_entropy(out.double(), y).item()
    assert math.isclose(h["valid_loss"], ce, rel_tol=1e-5)
    assert math.isclose(h["valid_perplexity"], math.exp(ce), rel_tol=1e-5)


# --- no host synchronisation per batch ---------------------------------------------------------------
def count_syncs(train_batches):
    import io
    from trainloop_nb.callbacks.progress import ProgressPrinter
    loop, model = make_loop([ProgressPrinter(mode="plain", file=io.StringIO())], defaults=True,
                            train_batches=train_batches, metrics=["accuracy", "top5_accuracy", "mcc", "perplexity"])
    with count_host_reads() as count:
        loop.fit(model, epochs=2)
    return count[0]


def test_per_batch_path_reads_nothing_back_from_the_device():
    # The syncs are per phase (reading the metrics at the phase's end), so they do not grow with the data.
    few, many = count_syncs(train_batches=3), count_syncs(train_batches=12)
    assert few == many > 0


def count_syncs_and_steps(train_batches, **options):
    loop, model = make_loop(train_batches=train_batches, metrics=["accuracy", "top5_accuracy", "mcc", "perplexity"])
    with count_host_reads() as count:
        loop.fit(model, epochs=2, **options)
    return count[0], loop.step


@pytest.mark.parametrize("options", [dict(precision="bf16-mixed"), dict(accumulate_steps=2), dict(accumulate_steps=4),
                                     dict(precision="bf16-mixed", accumulate_steps=3)])
def test_mixed_precision_and_accumulation_add_no_host_reads(options):
    (few, _), (many, _) = count_syncs_and_steps(3, **options), count_syncs_and_steps(12, **options)
    assert few == many > 0


def test_float16_reads_only_what_grad_scaler_reads_once_per_step():
    # GradScaler.step reads its overflow flag (`.item()`) before an optimizer that cannot skip on the device;
    # that is PyTorch's read, once per step. The loop adds none: it learns of a skipped step from a step hook.
    (few, few_steps), (many, many_steps) = count_syncs_and_steps(3, precision="16-mixed"), count_syncs_and_steps(12, precision="16-mixed")
    assert many - few == many_steps - few_steps > 0


def test_state_is_fresh_at_fit_start_of_a_second_fit():
    seen = []
    def probe(loop, event):
        if event == "fit_start": seen.append((loop.batch_count, loop.batch_index, loop.phase, loop.epoch_index, loop.step))
    loop, model = make_loop([probe])
    loop.fit(model, epochs=2)
    loop.fit(model, epochs=1)
    assert seen == [(TRAIN_BATCHES, 0, None, 0, 0)] * 2


def test_history_has_one_record_per_epoch_even_when_an_epoch_is_cancelled_before_statistics_sees_it():
    class SkipFirst(Callback):
        order = -100  # before Statistics
        def epoch_start(self, loop):
            if loop.epoch_index == 0: raise CancelEpoch()
    loop, model = make_loop([SkipFirst()], defaults=True)
    loop.fit(model, epochs=2)
    assert [h["epoch"] for h in loop.history] == [1, 2]
    assert set(loop.history[0]) == {"epoch", "time"} and "train_loss" in loop.history[1]
    assert loop.history[0] is not loop.history[1]


# --- the architecture: a loop that knows only the loop -------------------------------------------------
def test_importing_the_loop_loads_no_display_module():
    assert display_modules_loaded_by("import trainloop_nb.loop") == []
    assert "trainloop_nb.callbacks.progress" in display_modules_loaded_by("from trainloop_nb import TrainingLoop")


def test_without_default_callbacks_the_numbers_are_all_there(tmp_path):
    from trainloop_nb.callbacks.logging import CSVLogger
    import csv
    quiet, model = make_loop([CSVLogger(tmp_path / "log.csv")], defaults=False, metrics=["accuracy"])
    history = quiet.fit(model, epochs=2)
    assert [type(cb).__name__ for cb in quiet.callbacks] == ["CSVLogger"]
    loud, model2 = make_loop(defaults=True, metrics=["accuracy"])
    loud_history = loud.fit(model2, epochs=2)
    strip = lambda hs: [{k: v for k, v in h.items() if k != "time"} for h in hs]
    assert strip(history) == strip(loud_history) and len(history) == 2
    assert all(math.isfinite(v) for h in strip(history) for v in h.values())
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert rows and all(math.isfinite(float(r["loss"])) and math.isfinite(float(r["accuracy"])) for r in rows)
    assert float(rows[-1]["accuracy"]) == pytest.approx(history[-1]["valid_accuracy"])


def test_a_default_is_replaced_by_an_instance_of_its_class_only():
    from trainloop_nb.callbacks.progress import ProgressPrinter
    class MyPrinter(ProgressPrinter): pass
    class ProgressPrinterLookalike(Callback): pass  # same idea, unrelated class: does not replace the default
    ProgressPrinterLookalike.__name__ = "ProgressPrinter"
    mine = MyPrinter(mode="plain")
    loop, model = make_loop([mine], defaults=True)
    loop.fit(model, epochs=1)
    assert loop.callbacks == [mine]
    lookalike = ProgressPrinterLookalike()
    loop, model = make_loop([lookalike], defaults=True)
    loop.fit(model, epochs=1)
    assert [type(cb) for cb in loop.callbacks] == [ProgressPrinter, ProgressPrinterLookalike]


def test_phase_is_a_string_valued_enum():
    seen = set()
    def look(loop, event):
        if event == "batch_end": seen.add((loop.phase, loop.phase == "training", isinstance(loop.phase, core.Phase)))
    loop, model = make_loop([look])
    loop.fit(model, epochs=1)
    assert seen == {(core.Phase.training, True, True), (core.Phase.validation, False, True)}
    assert loop.phase is None


def test_every_fit_end_handler_runs_when_one_fails(tmp_path):
    from trainloop_nb.callbacks.logging import CSVLogger
    class Broken(Callback):
        def fit_end(self, loop): raise OSError("first")
    class AlsoBroken(Callback):
        def fit_end(self, loop): raise ValueError("second")
    logger = CSVLogger(tmp_path / "log.csv")
    loop, model = make_loop([Broken(), AlsoBroken(), logger])
    with pytest.raises(OSError, match="first") as info:
        loop.fit(model, epochs=1)
    assert logger.file is None  # closed
    rows = list(open(tmp_path / "log.csv"))
    assert len(rows) == 1 + TRAIN_BATCHES + VALID_BATCHES  # header and every batch: the file is complete
    assert any("second" in note for note in info.value.__notes__)


def test_a_failing_fit_end_handler_after_an_error_is_noted_on_the_error():
    class Failing(Callback):
        def batch_end(self, loop): raise RuntimeError("in the fit")
        def fit_end(self, loop): raise OSError("in fit_end")
    loop, model = make_loop([Failing()])
    with pytest.raises(RuntimeError, match="in the fit") as info:
        loop.fit(model, epochs=1)
    assert any("in fit_end" in note for note in info.value.__notes__)


def test_the_loss_class_instead_of_an_instance_says_what_to_write():
    with pytest.raises(TypeError, match=r"CrossEntropyLoss\(\)"):
        TrainingLoop(TrainingEpochs((torch.zeros(4, 2), torch.zeros(4).long()), 2),
                     optimizer=torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1), loss_func=torch.nn.CrossEntropyLoss)


def test_numpy_integer_epochs_are_accepted():
    import numpy as np
    loop, model = make_loop()
    loop.fit(model, epochs=np.int64(2))
    assert len(loop.history) == 2 and loop.epoch_count == 2 and type(loop.epoch_count) is int
