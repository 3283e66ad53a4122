"""CallbackInspector: event counts and timings against independent oracles, toggling, the widget, and scripts without ipywidgets."""
from __future__ import annotations

import collections
import itertools
import subprocess
import sys
import time

import pytest
import torch

from trainloop_nb.core import Callback, CancelBatch, Event
from trainloop_nb.data import TrainingEpochs, ValidationBatches
from trainloop_nb.callbacks.inspector import CallbackInspector, EventRecord, InspectorView, format_seconds
from trainloop_nb.loop import TrainingLoop

from toy_runs import toy_loop
from trainloop_nb.callbacks.progress import ProgressPrinter

TRAIN_BATCHES, VALID_BATCHES = 6, 2  # 192 samples in batches of 32; 40 in batches of 32 (the last one short)
EVENTS = [e.value for e in Event]


def make_loop(callbacks=(), validation=True, seed=0):
    return toy_loop(callbacks, train=192, valid=40, features=5, validation=validation, seed=seed, rule="first")


def expected_counts(epochs, train=TRAIN_BATCHES, valid=VALID_BATCHES):
    "Event counts of a fit without cancellations, from the loop's documented event order."
    return {"fit_start": 1, "epoch_start": epochs, "training_start": epochs, "batch_start": epochs * (train + valid),
            "update_start": epochs * train, "inference_prediction_end": epochs * valid,
            "batch_end": epochs * (train + valid), "training_end": epochs, "validation_start": epochs,
            "validation_end": epochs, "record_added": epochs, "epoch_end": epochs, "fit_end": 1}


class EventCounter:
    "The oracle: a plain function callback counting every event it is called for."
    def __init__(self): self.counts = collections.Counter()
    def __call__(self, loop, event): self.counts[event.value] += 1


class Sleepy(Callback):
    "Takes `seconds` of a fake clock (`now`, a one-item list) at each training batch_end."
    def __init__(self, seconds=0.0, now=None): self.seconds, self.now = seconds, now if now is not None else [0.0]
    def batch_end(self, loop):
        if loop.phase == "training": self.now[0] += self.seconds


class BatchCounter(Callback):
    def __init__(self): self.calls = 0
    def batch_start(self, loop): self.calls += 1


def test_counts_match_the_event_order_and_an_independent_counter():
    oracle, inspector = EventCounter(), CallbackInspector()
    loop, model = make_loop([oracle, inspector])
    loop.fit(model, epochs=3)
    assert inspector.counts == expected_counts(3)
    assert inspector.counts == dict(oracle.counts)


def test_timings_cover_every_handled_pair_and_mean_is_total_over_calls():
    inspector = CallbackInspector(clock=itertools.count().__next__)  # a clock that moves by 1 at each read
    loop, model = make_loop([Sleepy(0.0), inspector])
    loop.fit(model, epochs=2)
    t, counts = inspector.timings, inspector.counts
    handled = {(type(cb).__name__, e.value) for e, cbs in loop.handlers.items() for cb in cbs
               if cb is not inspector}
    assert set(t) == handled
    assert ("ProgressPrinter", "fit_start") in t and ("ProgressPrinter", "record_added") in t and ("Sleepy", "batch_end") in t
    for (name, event), v in t.items():
        assert v["calls"] == counts[event], (name, event)  # each handler ran once per event
        assert v["total"] == v["calls"] and v["mean"] == 1.0  # one tick between the two reads around each call


def test_timings_add_up_the_clock_around_each_handler():
    now = [0.0]
    inspector = CallbackInspector(clock=lambda: now[0])
    loop, model = make_loop([Sleepy(1 / 256, now), inspector])
    loop.fit(model, epochs=2)
    timings, total, calls = inspector.timings, 2 * TRAIN_BATCHES / 256, 2 * (TRAIN_BATCHES + VALID_BATCHES)
    assert timings.pop(("Sleepy", "batch_end")) == {"total": total, "calls": calls, "mean": total / calls}
    assert timings and all(v["total"] == 0.0 for v in timings.values())  # the clock stood still in every other one
    assert CallbackInspector().clock is time.perf_counter  # by default, real time


def test_second_fit_resets_and_does_not_time_twice():
    inspector = CallbackInspector()
    loop, model = make_loop([Sleepy(0.0), inspector])
    loop.fit(model, epochs=2)
    loop.fit(model, epochs=1)
    assert inspector.counts == expected_counts(1)
    # a wrapper installed twice would count each call twice
    assert all(v["calls"] == inspector.counts[event] for (name, event), v in inspector.timings.items())
    assert inspector.timings["Sleepy", "batch_end"]["calls"] == TRAIN_BATCHES + VALID_BATCHES


def test_a_fit_without_the_inspector_is_not_timed_by_it():
    inspector, sleepy = CallbackInspector(), Sleepy(0.0)
    loop, model = make_loop([sleepy])
    loop.fit(model, epochs=1, callbacks=[inspector])  # this fit only
    before = inspector.timings
    loop.fit(model, epochs=2)
    assert inspector.timings == before and inspector.counts == expected_counts(1)


def test_counts_survive_a_later_callback_cancelling_batches():
    class CancelEveryOther(Callback):
        def batch_start(self, loop):
            if loop.batch_index % 2: raise CancelBatch()
    oracle, inspector = EventCounter(), CallbackInspector()
    loop, model = make_loop([oracle, CancelEveryOther(), inspector])  # the inspector is listed last, runs first
    loop.fit(model, epochs=1)
    assert inspector.counts == dict(oracle.counts)
    assert inspector.counts["batch_start"] == TRAIN_BATCHES + VALID_BATCHES
    assert inspector.counts["update_start"] == TRAIN_BATCHES // 2
    assert inspector.timings["CancelEveryOther", "batch_start"]["calls"] == TRAIN_BATCHES + VALID_BATCHES


def test_report_names_every_callback_and_event():
    inspector = CallbackInspector()
    loop, model = make_loop([Sleepy(0.0), inspector])
    loop.fit(model, epochs=1)
    report = inspector.report()
    for name in ("ProgressPrinter", "Sleepy"): assert name in report
    for event in EVENTS: assert event in report
    row = next(line for line in report.splitlines() if line.startswith("Sleepy"))
    assert row.split()[:3] == ["Sleepy", "batch_end", str(TRAIN_BATCHES + VALID_BATCHES)]


def test_duplicate_names_are_told_apart():
    inspector = CallbackInspector()
    loop, model = make_loop([Sleepy(0.0), Sleepy(0.0), inspector])
    loop.fit(model, epochs=1)
    assert ("Sleepy", "batch_end") in inspector.timings and ("Sleepy#2", "batch_end") in inspector.timings


def test_event_log_is_bounded_and_ends_with_the_last_events():
    inspector = CallbackInspector(log_size=5)
    loop, model = make_loop([inspector])
    loop.fit(model, epochs=2)
    events = inspector.events
    assert len(events) == 5 and all(isinstance(e, EventRecord) for e in events)
    assert [e.event for e in events] == ["batch_end", "validation_end", "record_added", "epoch_end", "fit_end"]
    last_batch = [e for e in events if e.event == "batch_end"][-1]
    assert last_batch == EventRecord("batch_end", 1, VALID_BATCHES - 1, "validation")
    assert events[-1] == EventRecord("fit_end", None, None, None)


def test_state_after_fit():
    inspector = CallbackInspector()
    loop, model = make_loop([inspector])
    loop.fit(model, epochs=2)
    s = inspector.state
    assert s["epoch_index"] == 1 and s["step"] == 2 * TRAIN_BATCHES and s["learning_rate"] == 0.1
    assert s["last_stats"]["loss"] == pytest.approx(loop.history[-1]["valid_loss"])


def test_disabling_a_callback_stops_it_from_the_next_event():
    counter, inspector = BatchCounter(), CallbackInspector()

    class SwitchOff(Callback):
        def batch_end(self, loop):
            if loop.phase == "training" and loop.batch_index == 2: loop.set_enabled(counter, False)
    loop, model = make_loop([counter, SwitchOff(), inspector])
    loop.fit(model, epochs=2)
    assert counter.calls == 3  # batch_start of batches 0, 1, 2 of the first epoch, none after
    assert inspector.timings["BatchCounter", "batch_start"]["calls"] == 3
    assert inspector.counts["batch_start"] == 2 * (TRAIN_BATCHES + VALID_BATCHES)
    loop.set_enabled(counter, True)
    loop.fit(model, epochs=1)
    assert counter.calls == 3 + 3  # on again from the start of the fit, until SwitchOff strikes again


def test_switching_the_inspector_off_removes_its_timers():
    inspector, sleepy = CallbackInspector(), Sleepy(0.0)
    loop, model = make_loop([sleepy, inspector])
    loop.set_enabled(inspector, False)
    loop.fit(model, epochs=1)
    assert inspector.counts == dict.fromkeys(EVENTS, 0)
    assert all(v["calls"] == 0 for v in inspector.timings.values())


def test_callback_errors_still_name_the_callback():
    class Broken(Callback):
        def batch_end(self, loop): raise ValueError("broken")
    loop, model = make_loop([Broken(), CallbackInspector()])
    with pytest.raises(ValueError) as info:
        loop.fit(model, epochs=1)
    assert any("Broken" in note and "batch_end" in note for note in getattr(info.value, "__notes__", []))


def test_widget_grid_matches_the_dispatch_table():
    pytest.importorskip("ipywidgets")
    import ipywidgets
    inspector, counter = CallbackInspector(), BatchCounter()
    loop, model = make_loop([counter, inspector])
    loop.fit(model, epochs=1)
    view = inspector.view
    assert isinstance(view, InspectorView) and isinstance(view.widget, ipywidgets.VBox)
    rows = sorted(loop.callbacks, key=lambda cb: getattr(cb, "order", 0))
    assert len(view.cells) == len(view.checkboxes) == len(rows) == 3
    assert all(len(row) == len(EVENTS) for row in view.cells)
    assert len(view.grid.children) == (len(rows) + 2) * (len(EVENTS) + 2)
    for cb, row in zip(rows, view.cells):
        for event, cell in zip(Event, row):
            assert ("●" in cell.value) == (cb in loop.handlers[event]), (cb, event)
    for cell, n in zip(view.count_cells, inspector.counts.values()): assert f"<b>{n}</b>" in cell.value
    bundle = inspector._repr_mimebundle_()
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == view.widget.model_id
    assert bundle["text/plain"] == "CallbackInspector()"
    view.event_choice.value = "batch_start"
    assert "BatchCounter" in view.table.value and "ProgressPrinter" not in view.table.value


def test_widget_checkbox_switches_a_callback_off_for_the_next_fit():
    pytest.importorskip("ipywidgets")
    inspector, counter = CallbackInspector(), BatchCounter()
    loop, model = make_loop([counter, inspector])
    loop.fit(model, epochs=1)
    row = [cb for cb in inspector.callbacks].index(counter)
    inspector.view.checkboxes[row].value = False
    assert not loop.is_enabled(counter)
    assert "○" in inspector.view.cells[row][EVENTS.index("batch_start")].value
    loop.fit(model, epochs=1)
    assert counter.calls == TRAIN_BATCHES + VALID_BATCHES  # the first fit's only
    inspector.view.checkboxes[row].value = True
    loop.fit(model, epochs=1)
    assert counter.calls == 2 * (TRAIN_BATCHES + VALID_BATCHES)


def test_widget_refreshes_are_throttled():
    pytest.importorskip("ipywidgets")
    now = [0.0]
    inspector = CallbackInspector(refresh=1.0, clock=lambda: now[0])  # a clock that stands still: never due
    loop, model = make_loop([inspector])
    view = inspector.view  # shown before the fit, as in a notebook
    assert "Not attached" in view.status.value
    refreshes = []
    original = view.refresh
    view.refresh = lambda: (refreshes.append(1), original())
    loop.fit(model, epochs=3)
    other_fit_ends = sum(cb is not inspector for cb in loop.handlers[Event.fit_end])
    # fit_start and fit_end (the inspector's own, and after each other fit_end handler): never per batch
    assert len(refreshes) == 2 + other_fit_ends and other_fit_ends >= 1
    assert "step 18" in view.status.value
    inspector.refresh = 0.0
    refreshes.clear()
    loop.fit(model, epochs=1)
    assert len(refreshes) == sum(inspector.counts.values()) + other_fit_ends  # no throttle: every event redraws


def test_a_script_never_imports_ipywidgets():
    code = """
import sys, io, torch
from trainloop_nb.callbacks.inspector import CallbackInspector
from trainloop_nb.data import TrainingEpochs
from trainloop_nb.loop import TrainingLoop
from trainloop_nb.callbacks.progress import ProgressPrinter
x = torch.randn(64, 4); y = (x[:, 0] > 0).long(); model = torch.nn.Linear(4, 2)
inspector = CallbackInspector()
loop = TrainingLoop(TrainingEpochs((x, y), 16), None, torch.optim.SGD(model.parameters(), lr=0.1),
                    callbacks=[ProgressPrinter(file=io.StringIO()), inspector])
loop.fit(model, epochs=2)
assert inspector.counts["batch_end"] == 8, inspector.counts
inspector.report(); repr(inspector)
print([m for m in ("ipywidgets", "IPython") if m in sys.modules])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_bad_arguments():
    with pytest.raises(ValueError, match="refresh"): CallbackInspector(refresh=-1)
    with pytest.raises(ValueError, match="log_size"): CallbackInspector(log_size=0)


def test_format_seconds():
    assert format_seconds(2.5) == "2.50 s" and format_seconds(0.0123) == "12.3 ms" and format_seconds(42e-6) == "42 µs"
    assert format_seconds(float("nan")) == ""


def test_the_inspector_leaves_no_trace_on_the_loop():
    inspector = CallbackInspector()
    loop, model = make_loop([inspector])
    loop.fit(model, epochs=1)
    calls = lambda: {key: cell["calls"] for key, cell in inspector.timings.items() if cell["calls"]}
    first = calls()
    assert sum(first.values()) > 0  # the fit's handlers timed
    loop.fit(model, epochs=1, callbacks=[])  # same loop, the inspector still listed: still timed
    second = calls()
    assert second == first  # each fit timed anew
    loop.user_callbacks.remove(inspector)
    history = loop.fit(model, epochs=1)
    assert calls() == second and len(history) == 1  # its wrappers went with it: nothing timed any more
