"""Long runs: an interrupted run, resumed, ends bitwise equal to the run that was never interrupted (CPU).

Interruptions at every event (and inside both phases), by a callback raising KeyboardInterrupt; resumed from
the checkpoint written at fit_end in fresh objects (as a new process would) and in memory with loop.resume().
Process tests: SIGKILL after the second checkpoint, and SIGTERM. Then the callbacks' own state (CSV, TensorBoard,
schedule, progress), data that is not TrainingEpochs, non-finite losses, and inputs the loop refuses.
"""
from __future__ import annotations

import copy
import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from trainloop_nb.callbacks.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from trainloop_nb.callbacks.logging import CSVLogger, TensorBoardLogger
from trainloop_nb.callbacks.progress import ProgressPrinter, format_value
from trainloop_nb.callbacks.schedule import LearningRateScheduler, ScheduleSegment, cosine, linear
from trainloop_nb.core import Callback, Event
from trainloop_nb.data import TrainingEpochs, ValidationBatches
from trainloop_nb.loop import TrainingLoop
from trainloop_nb.losses import mean_squared_error, sigmoid_cross_entropy
from toy_runs import InterruptAt

from host_reads import count_host_reads

EPOCHS = 2
HERE = Path(__file__).parent
# Resumed fits below mostly leave the Checkpoint out; the warning that its state goes unused has a test of its own.
pytestmark = pytest.mark.filterwarnings("ignore:.*holds the state of a callback Checkpoint:UserWarning")


def toy(samples=60, features=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, features, generator=g)
    return x, (x[:, 0] - x[:, 1] > 0).long()


def dropout_model(features=5, seed=1):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(features, 12), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(12, 2))


def warmup_schedule():
    return LearningRateScheduler([ScheduleSegment(linear, 0.0, 0.02, 3), ScheduleSegment(cosine, end_rate=0.002)])


def build(directory: Path, extra=(), training=None, validation="default", csv=True):
    "The run every resume test repeats: dropout, Adam, a warm-up schedule, shuffled TrainingEpochs, a CSV log."
    x, y = toy()
    model = dropout_model()
    training = training if training is not None else TrainingEpochs((x[:48], y[:48]), batch_size=16, seed=3)
    validation = ValidationBatches((x[48:], y[48:]), 5) if validation == "default" else validation
    callbacks = [warmup_schedule(), *([CSVLogger(directory / "log.csv")] if csv else []), *extra]
    loop = TrainingLoop(training, validation, torch.optim.Adam(model.parameters(), lr=0.02), metrics=["accuracy"],
                        callbacks=callbacks, include_default_callbacks=False)
    return loop, model


def without_time(history):
    return [{k: v for k, v in record.items() if k != "time"} for record in history]


def same_weights(a: torch.nn.Module, b_state: dict) -> bool:
    return all(torch.equal(v, b_state[k]) for k, v in a.state_dict().items())


def same_optimizer(a: dict, b: dict) -> bool:
    for sa, sb in zip(a["state"].values(), b["state"].values()):
        if sa.keys() != sb.keys() or not all(torch.equal(sa[k], sb[k]) for k in sa): return False
    return len(a["state"]) == len(b["state"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    "The uninterrupted run: final weights, optimizer state, history, CSV log, and every event in order."
    directory = tmp_path_factory.mktemp("reference")
    seen = []
    loop, model = build(directory, [lambda loop, event: seen.append(event)])
    history = loop.fit(model, epochs=EPOCHS)
    return {"weights": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(loop.optimizer.state_dict()),
            "history": without_time(history), "csv": (directory / "log.csv").read_text(), "events": seen,
            "step": loop.step}


def interruption_points(events):
    "(event, n) for every event of the run but fit_end: each the n-th time that event fires."
    points, counts = [], {}
    for event in events:
        counts[event] = counts.get(event, 0) + 1
        if event is not Event.fit_end: points.append((event, counts[event]))
    return points


def check_equal(reference, model, loop, history, directory):
    assert same_weights(model, reference["weights"])
    assert same_optimizer(loop.optimizer.state_dict(), reference["optimizer"])
    assert without_time(history) == reference["history"]
    assert (directory / "log.csv").read_text() == reference["csv"]  # one header, each row exactly once


def test_interrupted_at_every_event_resumes_bitwise(reference, tmp_path):
    points = interruption_points(reference["events"])
    assert len(points) > 40 and {e for e, _ in points} == set(Event) - {Event.fit_end}
    for i, (event, n) in enumerate(points):
        where = f"KeyboardInterrupt at {event.value} #{n}"
        # From the checkpoint written at fit_end, in fresh objects (as a new process would)
        directory = tmp_path / f"file{i}"
        loop, model = build(directory, [InterruptAt(event, n), Checkpoint(directory / "checkpoints")])
        with pytest.raises(KeyboardInterrupt): loop.fit(model, epochs=EPOCHS)
        loop, model = build(directory, [Checkpoint(directory / "checkpoints")])
        torch.manual_seed(1234)  # a new process has its own seed: the checkpoint's generators replace it
        history = loop.fit(model, epochs=EPOCHS, resume_from=directory / "checkpoints")
        try: check_equal(reference, model, loop, history, directory)
        except AssertionError as e: raise AssertionError(f"{where}, resumed from the checkpoint") from e
        # In memory
        directory = tmp_path / f"memory{i}"
        stop = InterruptAt(event, n)
        loop, model = build(directory, [stop])
        with pytest.raises(KeyboardInterrupt): loop.fit(model, epochs=EPOCHS)
        torch.manual_seed(1234)
        history = loop.resume()  # the callback has fired: it does not interrupt again
        try: check_equal(reference, model, loop, history, directory)
        except AssertionError as e: raise AssertionError(f"{where}, resumed in memory") from e


# --- the generators' state at a batch's start, kept only while the batches draw random numbers ------------------------
class DropoutFrom(Callback):
    "Dropout draws nothing until training batch `start` of each epoch (the module is in eval mode before it)."
    def __init__(self, start): self.start = start
    def batch_start(self, loop):
        if loop.phase == "training": loop.model[2].train(loop.batch_index >= self.start)


def late_dropout_run(extra=(), start=40):
    "A dropout model whose batches draw random numbers only from batch `start` of each 100-batch epoch on."
    x, y = toy(200)
    model = dropout_model()
    loop = TrainingLoop(TrainingEpochs((x, y), batch_size=2, seed=3), None, torch.optim.SGD(model.parameters(), lr=0.05),
                        callbacks=[DropoutFrom(start), *extra], include_default_callbacks=False)
    return loop, model


# (update_start, 44): four batches after dropout began mid-phase, a case an earlier version (which looked at the
# generators every 16 batches instead of cloning them as each batch starts) could not resume exactly
@pytest.mark.parametrize("event, n", [(Event.update_start, 30), (Event.update_start, 44), (Event.batch_end, 57),
                                      (Event.update_start, 75)])
def test_resume_inside_a_batch_is_exact_whether_the_batches_draw_or_not(event, n):
    "Stopped inside batch 30 (no draws yet), right after the first drawing batches, or well after: the same weights."
    loop, model = late_dropout_run()
    loop.fit(model, epochs=2)
    reference = copy.deepcopy(model.state_dict())
    loop, model = late_dropout_run([InterruptAt(event, n)])
    with pytest.raises(KeyboardInterrupt) as stopped: loop.fit(model, epochs=2)
    assert not any("draws" in note for note in getattr(stopped.value, "__notes__", []))
    torch.manual_seed(99)
    loop.resume()
    assert same_weights(model, reference)


def test_a_stop_as_the_training_data_is_opened_resumes(tmp_path):
    "An error from iter(data) of the second epoch's training phase, before any of its batches: resume() continues exactly."
    class FailsOnce:
        def __init__(self, data): self.data, self.calls = data, 0
        def __len__(self): return len(self.data)
        def __iter__(self):
            self.calls += 1
            if self.calls == 2: raise OSError("the data's disk went away")
            return iter(self.data)
    loop, model = build(tmp_path, csv=False)
    reference_history = loop.fit(model, epochs=EPOCHS)
    reference = copy.deepcopy(model.state_dict())
    x, y = toy()
    loop, model = build(tmp_path, training=FailsOnce(TrainingEpochs((x[:48], y[:48]), batch_size=16, seed=3)), csv=False)
    with pytest.raises(OSError) as stopped: loop.fit(model, epochs=EPOCHS)
    assert not any("will not be possible" in note for note in getattr(stopped.value, "__notes__", []))
    history = loop.resume()
    assert same_weights(model, reference) and without_time(history) == without_time(reference_history)


def test_interrupted_twice_and_resumed_twice(reference, tmp_path):
    loop, model = build(tmp_path, [InterruptAt(Event.update_start, 2), InterruptAt(Event.inference_prediction_end, 3)])
    with pytest.raises(KeyboardInterrupt): loop.fit(model, epochs=EPOCHS)
    with pytest.raises(KeyboardInterrupt): loop.resume()
    history = loop.resume()
    check_equal(reference, model, loop, history, tmp_path)
    with pytest.raises(RuntimeError, match="no stopped fit"): loop.resume()


def test_state_dict_round_trips_through_a_file_and_load_state_dict(reference, tmp_path):
    from trainloop_nb.callbacks.checkpoint import save_checkpoint
    saved = {}
    class SaveAt(Callback):
        order = 100
        def batch_end(self, loop):
            if loop.phase == "validation" and loop.batch_index == 0 and loop.epoch_index == 0:
                save_checkpoint(loop.state_dict(), tmp_path / "mid.pt")
                saved["step"] = loop.step
    loop, model = build(tmp_path / "first", [SaveAt()])
    loop.fit(model, epochs=EPOCHS)
    state = load_checkpoint(tmp_path / "mid.pt")  # weights_only: tensors, builtins and numpy arrays only
    assert state["step"] == saved["step"] and state["position"]["phase"] == "validation" and state["position"]["batch"] == 1
    loop, model = build(tmp_path / "first")  # its CSV log is cut back to the saved point, then continued
    loop.load_state_dict(state)
    history = loop.fit(model, epochs=EPOCHS)
    check_equal(reference, model, loop, history, tmp_path / "first")


def test_every_rng_is_saved_and_restored(tmp_path):
    import random
    import numpy as np
    draws = {}
    def draw(loop, event):  # a callback drawing from every generator, as augmentation might
        if event is Event.batch_start and loop.phase == "training":
            draws.setdefault(id(loop), []).append((random.random(), float(np.random.rand()), float(torch.rand(()))))
    random.seed(0); np.random.seed(0)
    loop, model = build(tmp_path / "a", [draw], csv=False)
    loop.fit(model, epochs=EPOCHS)
    expected = draws.pop(id(loop))
    random.seed(0); np.random.seed(0)
    loop, model = build(tmp_path / "b", [draw, InterruptAt(Event.epoch_end, 1), Checkpoint(tmp_path / "ck")],
                        csv=False)
    with pytest.raises(KeyboardInterrupt): loop.fit(model, epochs=EPOCHS)
    first = draws.pop(id(loop))
    random.seed(99); np.random.seed(99)
    loop, model = build(tmp_path / "b", [draw, Checkpoint(tmp_path / "ck")], csv=False)
    loop.fit(model, epochs=EPOCHS, resume_from=tmp_path / "ck")
    assert first + draws[id(loop)] == expected


# --- process tests ---------------------------------------------------------------------------------------------
def child(directory: Path, mode: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, str(HERE / "long_run_child.py"), str(directory), mode], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, timeout=240) -> tuple[int, str]:
    try: output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        raise AssertionError(f"the child did not finish in {timeout} s:\n{output}")
    return process.returncode, output


def wait_for(path: Path, process: subprocess.Popen, timeout=240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None: raise AssertionError(f"the child ended early:\n{process.communicate()[0]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.05)


def tensorboard_scalars(run_dir: Path, tag: str, folder="train"):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir / folder)).Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def only_run(directory: Path) -> Path:
    runs = [p for p in (directory / "tb").iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


@pytest.fixture(scope="module")
def full_process(tmp_path_factory):
    directory = tmp_path_factory.mktemp("full")
    code, output = finish(child(directory, "full"))
    assert code == 0, output
    return directory


def assert_same_as_full(directory: Path, full: Path) -> None:
    weights, expected = torch.load(directory / "weights.pt"), torch.load(full / "weights.pt")
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
    assert json.loads((directory / "history.json").read_text()) == json.loads((full / "history.json").read_text())
    assert (directory / "log.csv").read_text() == (full / "log.csv").read_text()
    for tag, folder in (("batch_loss", "train"), ("learning_rate", "train"), ("epoch_loss", "train"), ("epoch_loss", "validation")):
        assert tensorboard_scalars(only_run(directory), tag, folder) == tensorboard_scalars(only_run(full), tag, folder), tag


def test_sigkill_after_the_second_checkpoint_then_resume_in_a_new_process(full_process, tmp_path):
    process = child(tmp_path, "stall")
    wait_for(tmp_path / "ready", process)  # inside step 10: checkpoints at steps 4 and 8, rows and scalars up to 10
    process.kill()
    code, _ = finish(process)
    assert code == -signal.SIGKILL
    from trainloop_nb.callbacks.checkpoint import list_checkpoints
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-00000004.pt", "step-00000008.pt"]
    code, output = finish(child(tmp_path, "resume"))
    assert code == 0, output
    assert_same_as_full(tmp_path, full_process)
    steps = [s for s, _ in tensorboard_scalars(only_run(tmp_path), "batch_loss")]
    assert steps == sorted(set(steps)) == list(range(1, 19))  # no step twice


def test_sigterm_runs_fit_end_writes_a_checkpoint_and_exits_as_sigterm(full_process, tmp_path):
    process = child(tmp_path, "stall")
    wait_for(tmp_path / "ready", process)
    process.send_signal(signal.SIGTERM)  # arrives inside a training batch: held until the batch is complete
    code, output = finish(process)  # the child goes on once the loop's handler has taken the signal
    assert code == -signal.SIGTERM, output
    from trainloop_nb.callbacks.checkpoint import latest_checkpoint
    newest = latest_checkpoint(tmp_path / "checkpoints")
    assert newest.name == "step-00000010.pt" and load_checkpoint(newest)["step"] == 10
    lines = (tmp_path / "log.csv").read_text().splitlines()  # closed: every row whole, the last of step 10
    assert lines[0].startswith("epoch,batch,phase") and lines[-1].startswith("2,4,training,")
    assert tensorboard_scalars(only_run(tmp_path), "batch_loss")[-1][0] == 10  # flushed up to the last step
    code, output = finish(child(tmp_path, "resume"))
    assert code == 0, output
    assert_same_as_full(tmp_path, full_process)


# --- signals in this process ---------------------------------------------------------------------------------------

def test_ctrl_c_during_the_step_is_held_until_the_batch_is_complete(reference, tmp_path, ctrl_c_raises):
    seen = []
    class CtrlCAtUpdate(Callback):
        def update_start(self, loop):
            if loop.step == 3: os.kill(os.getpid(), signal.SIGINT)
        def batch_end(self, loop):
            if loop.phase == "training": seen.append(loop.step)
    loop, model = build(tmp_path, [CtrlCAtUpdate()])
    with pytest.raises(KeyboardInterrupt): loop.fit(model, epochs=EPOCHS)
    assert loop.step == 4 and seen[-1] == 4  # the step was made and its batch_end ran
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back after the fit
    loop.user_callbacks = loop.user_callbacks[:2]  # schedule and CSV: no more Ctrl-C
    history = loop.resume()
    check_equal(reference, model, loop, history, tmp_path)


def test_a_second_ctrl_c_is_not_held(tmp_path, ctrl_c_raises):
    class TwiceAtUpdate(Callback):
        def update_start(self, loop):
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
    loop, model = build(tmp_path, [TwiceAtUpdate()])
    with pytest.raises(KeyboardInterrupt): loop.fit(model, epochs=EPOCHS)
    assert loop.step == 0


def test_handlers_are_left_alone_outside_the_main_thread_and_when_user_set(tmp_path):
    def mine(signum, frame): pass
    previous = signal.signal(signal.SIGTERM, mine)
    try:
        seen = []
        loop, model = build(tmp_path, [lambda loop, event: seen.append(signal.getsignal(signal.SIGTERM)) if event is Event.fit_start else None])
        loop.fit(model, epochs=EPOCHS)
        assert seen == [mine] and signal.getsignal(signal.SIGTERM) is mine
    finally: signal.signal(signal.SIGTERM, previous)
    outcome = []
    def in_thread():
        try:
            loop, model = build(tmp_path / "thread", csv=False)
            outcome.append(loop.fit(model, epochs=EPOCHS))
        except Exception as e: outcome.append(e)
    thread = threading.Thread(target=in_thread, daemon=True)
    thread.start(); thread.join(240)
    assert not thread.is_alive(), "the fit in another thread did not end in 240 s"
    assert len(outcome) == 1 and isinstance(outcome[0], list) and len(outcome[0]) == EPOCHS, outcome


# --- data that is not TrainingEpochs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("own_generator", [True, False])
def test_a_dataloader_resumes_mid_epoch_by_skipping(tmp_path, own_generator):
    x, y = toy()
    def loader():
        generator = torch.Generator().manual_seed(7) if own_generator else None
        return DataLoader(TensorDataset(x[:48], y[:48]), batch_size=10, shuffle=True, generator=generator)
    def run(extra, resume_from=None):
        torch.manual_seed(5)  # the script's seed: the global generator shuffles when the loader has none
        loop, model = build(tmp_path, extra, training=loader(), csv=False)
        return loop, model, loop.fit(model, epochs=3, resume_from=resume_from)
    _, expected_model, expected = run([])
    with pytest.raises(KeyboardInterrupt):
        run([InterruptAt(Event.update_start, 8), Checkpoint(tmp_path / "ck")])  # epoch 2, batch 3
    _, model, history = run([], resume_from=tmp_path / "ck")
    assert same_weights(model, expected_model.state_dict()) and without_time(history) == without_time(expected)


def test_training_epochs_resumes_by_position_without_making_the_batches_before(tmp_path):
    made = []
    class Counted(TrainingEpochs):
        def __iter__(self):
            for batch in super().__iter__():
                made.append(1)
                yield batch
    x, y = toy()
    loop, model = build(tmp_path, [InterruptAt(Event.update_start, 5), Checkpoint(tmp_path / "ck")],
                        training=Counted((x[:48], y[:48]), batch_size=16, seed=3), csv=False)
    with pytest.raises(KeyboardInterrupt): loop.fit(model, epochs=EPOCHS)  # epoch 2, in its second training batch
    state = load_checkpoint(tmp_path / "ck")
    assert state["position"]["phase_start"]["data"] == {"epoch": 1, "batch": 0} and state["position"]["batch"] == 1
    made.clear()
    data = Counted((x[:48], y[:48]), batch_size=16, seed=3)
    loop, model = build(tmp_path, training=data, csv=False)
    loop.fit(model, epochs=EPOCHS, resume_from=tmp_path / "ck")
    assert len(made) == 2 and data.epoch == 2  # the epoch's two remaining batches only


def test_training_epochs_state_dict():
    x, y = toy(20)
    data = TrainingEpochs((x, y), batch_size=4, seed=1)
    expected = [b[1] for b in list(TrainingEpochs((x, y), batch_size=4, seed=1, ))]
    assert data.state_dict() == {"epoch": 0, "batch": 0}
    data.load_state_dict({"epoch": 0, "batch": 1})
    assert data.state_dict() == {"epoch": 0, "batch": 1}
    data.load_state_dict({"epoch": 0, "batch": 3})  # a later load replaces an earlier one
    rest = [b[1] for b in data]
    assert len(rest) == 2 and all(torch.equal(a, b) for a, b in zip(rest, expected[3:])) and data.epoch == 1
    assert len(list(data)) == 5  # the start applies to one iter() only
    for bad in [{"epoch": -1}, {"epoch": 0, "batch": 6}, {"epoch": 1.5}, {}]:
        with pytest.raises(ValueError, match="state_dict"): data.load_state_dict(bad)


# --- callbacks with state --------------------------------------------------------------------------------------------
def test_scheduler_resumes_mid_warmup(tmp_path):
    def rates(extra, resume_from=None):
        seen = []
        def record(loop, event):
            if event is Event.update_start: seen.append((loop.step, loop.learning_rate))
        loop, model = build(tmp_path, [record, *extra], csv=False)
        try: loop.fit(model, epochs=EPOCHS, resume_from=resume_from)
        except KeyboardInterrupt: pass
        return seen
    expected = rates([])
    first = rates([InterruptAt(Event.update_start, 2), Checkpoint(tmp_path / "ck")])  # in the warm-up
    rest = rates([], resume_from=tmp_path / "ck")
    assert first[:-1] + rest == expected and rest[0][0] == 1


def test_csv_log_cuts_rows_written_after_the_checkpoint(reference, tmp_path):
    class Crash(Callback):
        def batch_end(self, loop):
            if loop.phase == "training" and loop.step == 5: raise RuntimeError("machine lost")  # no checkpoint for this
    loop, model = build(tmp_path, [Crash(), Checkpoint(tmp_path / "ck", every_steps=2, every_epochs=None)])
    with pytest.raises(RuntimeError): loop.fit(model, epochs=EPOCHS)
    rows = (tmp_path / "log.csv").read_text().splitlines()
    assert rows[-1].startswith("2,2,training")  # step 5 is written, past the checkpoint of step 4
    loop, model = build(tmp_path, [Checkpoint(tmp_path / "ck", every_steps=2, every_epochs=None)])
    history = loop.fit(model, epochs=EPOCHS, resume_from=tmp_path / "ck")
    check_equal(reference, model, loop, history, tmp_path)
    text = (tmp_path / "log.csv").read_text()
    assert text.count("epoch,batch,phase") == 1


def test_csv_log_missing_at_resume_starts_a_new_one(tmp_path):
    loop, model = build(tmp_path, [InterruptAt(Event.epoch_end, 1), Checkpoint(tmp_path / "ck")])
    with pytest.raises(KeyboardInterrupt): loop.fit(model, epochs=EPOCHS)
    (tmp_path / "log.csv").unlink()
    loop, model = build(tmp_path)
    with pytest.warns(UserWarning, match="missing"): loop.fit(model, epochs=EPOCHS, resume_from=tmp_path / "ck")
    lines = (tmp_path / "log.csv").read_text().splitlines()
    assert lines[0].startswith("epoch,batch,phase") and lines[1].startswith("2,1,training")


def test_tensorboard_continues_the_same_run_folder_without_duplicate_steps(tmp_path):
    pytest.importorskip("tensorboard")
    def run(directory, extra, resume_from=None):
        loop, model = build(directory, [TensorBoardLogger(directory / "tb"), *extra], csv=False)
        try: loop.fit(model, epochs=EPOCHS, resume_from=resume_from)
        except RuntimeError: pass
        return loop
    class Crash(Callback):
        def batch_end(self, loop):
            if loop.phase == "training" and loop.step == 5: raise RuntimeError("machine lost")
    full = run(tmp_path / "full", [])
    checkpoint = Checkpoint(tmp_path / "run" / "ck", every_steps=2, every_epochs=None)
    run(tmp_path / "run", [Crash(), checkpoint])
    assert [s for s, _ in tensorboard_scalars(only_run(tmp_path / "run"), "batch_loss")][-1] == 5
    run(tmp_path / "run", [Checkpoint(tmp_path / "run" / "ck", every_steps=2, every_epochs=None)], resume_from=tmp_path / "run" / "ck")
    resumed, expected = only_run(tmp_path / "run"), only_run(tmp_path / "full")
    for tag, folder in (("batch_loss", "train"), ("batch_accuracy", "train"), ("learning_rate", "train"),
                        ("epoch_loss", "train"), ("epoch_accuracy", "validation")):
        assert tensorboard_scalars(resumed, tag, folder) == tensorboard_scalars(expected, tag, folder), tag
    assert [s for s, _ in tensorboard_scalars(resumed, "batch_loss")] == list(range(1, full.step + 1))


def test_progress_printer_shows_the_epochs_before_the_stop(tmp_path):
    loop, model = build(tmp_path, [InterruptAt(Event.batch_end, 7), Checkpoint(tmp_path / "ck")], csv=False)
    with pytest.raises(KeyboardInterrupt): loop.fit(model, epochs=3)
    out = io.StringIO()
    loop, model = build(tmp_path, [ProgressPrinter(mode="plain", file=out)], csv=False)
    loop.fit(model, epochs=3, resume_from=tmp_path / "ck")
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("epoch") and lines[1].startswith("1 ") and "resumed at step" in lines[2]
    assert [l.split()[0] for l in lines[3:]] == ["2", "3"]


def test_a_checkpoint_of_another_model_is_refused_and_nothing_is_loaded(tmp_path):
    loop, model = build(tmp_path, [InterruptAt(Event.epoch_end, 1), Checkpoint(tmp_path / "ck")], csv=False)
    with pytest.raises(KeyboardInterrupt): loop.fit(model, epochs=EPOCHS)
    torch.manual_seed(0)
    other = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 2))
    before = copy.deepcopy(other.state_dict())
    x, y = toy()
    loop = TrainingLoop(TrainingEpochs((x, y), 16), None, torch.optim.Adam(other.parameters()), include_default_callbacks=False)
    with pytest.raises(CheckpointError, match=r"step-\d+\.pt holds the weights of another model"):
        loop.fit(other, epochs=EPOCHS, resume_from=tmp_path / "ck")
    assert same_weights(other, before) and loop.step == 0
    with pytest.raises(CheckpointError, match="not the state of a TrainingLoop run"): loop.load_state_dict({"model": {}})


def test_state_of_a_callback_the_fit_does_not_have_is_a_warning(tmp_path):
    loop, model = build(tmp_path, [InterruptAt(Event.epoch_end, 1), Checkpoint(tmp_path / "ck")])
    with pytest.raises(KeyboardInterrupt): loop.fit(model, epochs=EPOCHS)
    loop, model = build(tmp_path, csv=False)
    with pytest.warns(UserWarning, match="CSVLogger"): loop.fit(model, epochs=EPOCHS, resume_from=tmp_path / "ck")



def test_metric_sums_resume_bitwise_between_groups_of_batches(tmp_path):
    "Metric sums add the batches' values 128 at a time: a run saved mid-group (float64 losses) ends with the same history."
    from trainloop_nb.callbacks.checkpoint import save_checkpoint
    x, y = toy(2 * 300)
    x = x.double()
    def make(extra=()):
        torch.manual_seed(0)
        model = torch.nn.Linear(5, 2).double()
        loop = TrainingLoop(TrainingEpochs((x, y), batch_size=2, seed=1), ValidationBatches((x[:450], y[:450]), 3),
                            torch.optim.SGD(model.parameters(), lr=0.05), metrics=["accuracy"], callbacks=list(extra),
                            include_default_callbacks=False)
        return loop, model
    loop, model = make()
    expected = without_time(loop.fit(model, epochs=2))
    for n in (200, 300 + 140):  # after training batch 200 (a group added, 72 values waiting); validation batch 140
        loop, model = make([InterruptAt(Event.batch_end, n)])
        with pytest.raises(KeyboardInterrupt): loop.fit(model, epochs=2)
        save_checkpoint(loop.state_dict(), tmp_path / "mid.pt")
        loop, model = make()
        assert without_time(loop.fit(model, epochs=2, resume_from=tmp_path / "mid.pt")) == expected, n

# --- non-finite losses -------------------------------------------------------------------------------------------------
def nan_at(sample: int):
    x, y = toy(48)
    x[sample, 0] = float("nan")
    return x, y


def test_nonfinite_loss_names_epoch_batch_and_step():
    x, y = nan_at(2 * 8 + 3)  # batch 3 (1-based) of an unshuffled epoch of 8-sample batches
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 2)
    class SkipSecond(Callback):  # a cancelled batch makes no step: batch and step numbers part
        def batch_start(self, loop):
            if loop.phase == "training" and loop.epoch_index == 1 and loop.batch_index == 1: raise __import__("trainloop_nb").core.CancelBatch()
    data = TrainingEpochs((x, y), batch_size=8, shuffle=False)
    clean = TrainingEpochs((toy(48)[0], y), batch_size=8, shuffle=False)
    class SwitchData(Callback):
        def epoch_start(self, loop):
            if loop.epoch_index == 1: loop.training = data
    loop = TrainingLoop(clean, None, torch.optim.SGD(model.parameters(), lr=0.1), callbacks=[SwitchData(), SkipSecond()],
                        include_default_callbacks=False)
    with pytest.raises(FloatingPointError, match=r"epoch 2, batch 3 \(step 8\)"): loop.fit(model, epochs=3)
    assert len(loop.history) == 1


@pytest.mark.parametrize("options", [dict(accumulate_steps=2), dict(precision="bf16-mixed")])
def test_nonfinite_loss_is_caught_with_mixed_precision_and_accumulation(options):
    "Every path that makes a training loss is watched, not only the plain step."
    x, y = nan_at(3)  # a sample of the first batch
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 2)
    loop = TrainingLoop(TrainingEpochs((x, y), batch_size=8, shuffle=False), None,
                        torch.optim.SGD(model.parameters(), lr=0.1), include_default_callbacks=False)
    with pytest.raises(FloatingPointError, match=r"epoch 1, batch 1 "): loop.fit(model, epochs=2, **options)
    assert loop.history == []


def test_nonfinite_loss_found_past_many_groups_of_losses_and_through_a_resume():
    "The losses are checked a group at a time: the first of two non-finite ones, hundreds of batches in, is named, also after a stop and loop.resume()."
    x, y = toy(2 * 400)
    x[2 * 200, 0] = x[2 * 300 + 1, 0] = float("nan")  # batches 201 and 301 (1-based) of 2-sample unshuffled batches
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 2)
    loop = TrainingLoop(TrainingEpochs((x, y), batch_size=2, shuffle=False), None, torch.optim.SGD(model.parameters(), lr=0.1),
                        callbacks=[InterruptAt(Event.batch_end, 251)], include_default_callbacks=False)  # after batch 251
    with pytest.raises(KeyboardInterrupt): loop.fit(model, epochs=1, accumulate_steps=3)  # groups end at batches 3, 6, ...
    with pytest.raises(FloatingPointError, match=r"epoch 1, batch 201 \(step 67\)"): loop.resume()


def test_nonfinite_check_off_trains_on_and_prints_nan(tmp_path):
    x, y = nan_at(0)
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 2)
    out = io.StringIO()
    loop = TrainingLoop(TrainingEpochs((x, y), 8), ValidationBatches((x, y), 8), torch.optim.SGD(model.parameters(), lr=0.1),
                        callbacks=[ProgressPrinter(mode="plain", file=out), CSVLogger(tmp_path / "log.csv")],
                        stop_on_nonfinite=False)
    history = loop.fit(model, epochs=2)
    assert all(h["train_loss"] != h["train_loss"] for h in history)
    assert out.getvalue().splitlines()[1].split()[1] == "nan"
    assert "nan" in [row.split(",")[3] for row in (tmp_path / "log.csv").read_text().splitlines()]
    assert format_value(float("inf")) == "inf"


def test_nonfinite_check_reads_the_device_once_per_phase():
    def reads(batches):
        x, y = toy(8 * batches)
        torch.manual_seed(0)
        model = torch.nn.Linear(5, 2)
        loop = TrainingLoop(TrainingEpochs((x, y), 8), None, torch.optim.SGD(model.parameters(), lr=0.1),
                            include_default_callbacks=False)
        with count_host_reads() as count: loop.fit(model, epochs=2)
        return count[0]
    assert reads(3) == reads(12) == 2  # per epoch: the loss metric; the finiteness flag only after a non-finite loss


# --- inputs the loop refuses -----------------------------------------------------------------------------------------
def generator_of_batches(x, y, size=8):
    return ((x[i:i + size], y[i:i + size]) for i in range(0, len(x), size))


def test_single_use_training_data_is_named_at_the_second_epoch():
    x, y = toy(32)
    model = torch.nn.Linear(5, 2)
    loop = TrainingLoop(generator_of_batches(x, y), None, torch.optim.SGD(model.parameters(), lr=0.1), include_default_callbacks=False)
    with pytest.raises(ValueError, match="single-use iterator .*used up by an earlier epoch"): loop.fit(model, epochs=2)
    assert loop.step == 4


@pytest.mark.parametrize("validation, match", [([], "validation data is empty"),
                                               ("generator", "validation data is a single-use iterator")])
def test_validation_without_batches_is_an_error(validation, match):
    x, y = toy(32)
    model = torch.nn.Linear(5, 2)
    if validation == "generator": validation = generator_of_batches(x, y)
    loop = TrainingLoop(TrainingEpochs((x, y), 8), validation, torch.optim.SGD(model.parameters(), lr=0.1),
                        include_default_callbacks=False)
    with pytest.raises(ValueError, match=match): loop.fit(model, epochs=2)


def test_losses_accept_only_matching_target_shapes():
    out = torch.randn(6, 1)
    for target in (torch.rand(6), torch.rand(6, 1)):  # a trailing 1 may differ
        assert torch.isfinite(mean_squared_error(out, target)) and torch.isfinite(sigmoid_cross_entropy(out.squeeze(1), target))
    with pytest.raises(ValueError, match=r"target has shape \(2, 6\) but the output has shape \(6, 2\)"):
        mean_squared_error(torch.randn(6, 2), torch.randn(2, 6))
    with pytest.raises(ValueError, match=r"\(1, 6\).*\(6, 1\)"): sigmoid_cross_entropy(out, torch.rand(1, 6))
    with pytest.raises(ValueError, match=r"\(5,\).*\(6,\)"): mean_squared_error(torch.randn(6), torch.randn(5))


@dataclasses.dataclass
class Output:
    logits: torch.Tensor


def test_model_returning_a_tuple_is_told_what_to_do():
    class Wrapped(torch.nn.Module):
        def __init__(self): super().__init__(); self.layer = torch.nn.Linear(5, 2)
        def forward(self, x): return self.layer(x), self.layer(x)
    x, y = toy(16)
    model = Wrapped()
    loop = TrainingLoop(TrainingEpochs((x, y), 8), None, torch.optim.SGD(model.parameters(), lr=0.1), include_default_callbacks=False)
    with pytest.raises(TypeError, match="make the model return one tensor .* loss_func"): loop.fit(model)
    # a loss that takes the structure, with a metric that does not: the note says so
    loop = TrainingLoop(TrainingEpochs((x, y), 8), None, torch.optim.SGD(model.parameters(), lr=0.1),
                        loss_func=lambda out, t: torch.nn.functional.cross_entropy(out[0], t), metrics=["accuracy"],
                        include_default_callbacks=False)
    with pytest.raises(Exception) as info: loop.fit(model)
    assert any("metric 'accuracy' takes a tensor" in note for note in getattr(info.value, "__notes__", []))


@pytest.mark.parametrize("wrap", [lambda t: {"logits": t}, Output])
def test_an_output_with_logits_trains_and_measures_as_its_logits(wrap):
    "A mapping or an object with `logits` (a transformers ModelOutput is both): losses and metrics use the logits."
    x, y = toy(16)
    def run(wrap):
        torch.manual_seed(0)
        class Wrapped(torch.nn.Module):
            def __init__(self): super().__init__(); self.layer = torch.nn.Linear(5, 2)
            def forward(self, x): return wrap(self.layer(x))
        model = Wrapped()
        loop = TrainingLoop(TrainingEpochs((x, y), 8), TrainingEpochs((x, y), 8), torch.optim.SGD(model.parameters(), lr=0.1),
                            metrics=["accuracy"], include_default_callbacks=False)
        history = loop.fit(model, 2)
        return [p.detach().clone() for p in model.parameters()], [{k: v for k, v in h.items() if k != "time"} for h in history]
    weights, history = run(wrap)
    plain_weights, plain_history = run(lambda t: t)
    assert all(torch.equal(a, b) for a, b in zip(weights, plain_weights)) and history == plain_history


def test_optimizer_with_part_of_the_parameters_warns_with_counts():
    x, y = toy(16)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 2))
    loop = TrainingLoop(TrainingEpochs((x, y), 8), None, torch.optim.SGD(model[1].parameters(), lr=0.1), include_default_callbacks=False)
    with pytest.warns(UserWarning, match=r"holds 2 of the model's 4 trainable parameter tensors: 2 \(24 values\)"): loop.fit(model)
    model[0].requires_grad_(False)  # frozen on purpose: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loop.fit(model)


def test_two_csv_loggers_on_one_path_are_an_error(tmp_path):
    loop, model = build(tmp_path, [CSVLogger(tmp_path / "." / "log.csv")])
    with pytest.raises(ValueError, match="2 CSVLoggers in this fit write to"): loop.fit(model, epochs=EPOCHS)


def test_metric_sums_of_every_kind_resume_mid_phase(tmp_path):
    torchmetrics = pytest.importorskip("torchmetrics")
    def run(extra=(), resume_from=None):
        x, y = toy()
        torch.manual_seed(1)
        model = torch.nn.Linear(5, 2)
        loop = TrainingLoop(TrainingEpochs((x[:48], y[:48]), 8), ValidationBatches((x[48:], y[48:]), 4),
                            torch.optim.SGD(model.parameters(), lr=0.1), include_default_callbacks=False, callbacks=list(extra),
                            metrics=[torchmetrics.classification.MulticlassAccuracy(num_classes=2), "mcc", "top5_accuracy", "perplexity"])
        try: return loop.fit(model, epochs=2, resume_from=resume_from)
        except KeyboardInterrupt: return None
    expected = run()
    run([InterruptAt(Event.inference_prediction_end, 5), Checkpoint(tmp_path / "ck")])  # mid-validation
    assert load_checkpoint(tmp_path / "ck")["position"]["phase"] == "validation"
    assert without_time(run(resume_from=tmp_path / "ck")) == without_time(expected)


def test_a_float16_run_resumes_with_its_grad_scaler(tmp_path):
    "With precision='16-mixed' the checkpoint holds the GradScaler's scale and growth tracker, so the resumed run is the same."
    def run(stop_at=None, resume_from=None):
        loop, model = build(tmp_path, csv=False)
        extra = [InterruptAt(Event.batch_end, stop_at)] if stop_at else []
        try: loop.fit(model, epochs=EPOCHS, callbacks=extra, precision="16-mixed", resume_from=resume_from)
        except KeyboardInterrupt: return loop, model, loop.state_dict()
        return loop, model, None
    full, full_model, _ = run()
    _, _, state = run(stop_at=4)
    assert state["scaler"]["_growth_tracker"] > 0  # good steps counted since the start: a fresh scaler would count from 0
    resumed, resumed_model, _ = run(resume_from=copy.deepcopy(state))
    assert same_weights(resumed_model, full_model.state_dict())
    assert resumed.scaler.state_dict() == full.scaler.state_dict()
    assert without_time(resumed.history) == without_time(full.history)
