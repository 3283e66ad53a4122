"""Checkpoint files and the Checkpoint callback: atomic writes under failure, pruning, best.pt, and refusing bad files."""
from __future__ import annotations

import fractions
import os
import random
import zipfile

import numpy as np
import pytest
import torch

import trainloop_nb.callbacks.checkpoint as ckpt
from trainloop_nb.callbacks.checkpoint import (Checkpoint, CheckpointError, checkpoint_name, checkpoint_step, latest_checkpoint,
                                               list_checkpoints, load_checkpoint, prune_checkpoints, save_checkpoint)
from trainloop_nb.callbacks.early_stopping import EarlyStopping
from trainloop_nb.callbacks.progress import ProgressPrinter
from trainloop_nb.core import Callback, CancelBatch
from trainloop_nb.data import TrainingEpochs, ValidationBatches
from trainloop_nb.loop import TrainingLoop

STEPS_PER_EPOCH = 4


class LoopWithState(TrainingLoop):
    "Stands in for TrainingLoop.state_dict() (being written in the loop): model, optimizer, step, history, callbacks."
    def state_dict(self):
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
                "epoch_index": self.epoch_index, "history": [dict(r) for r in self.history],
                "callbacks": {type(cb).__name__: cb.state_dict() for cb in self.callbacks if hasattr(cb, "state_dict")}}


def make_loop(callbacks=(), seed=0, loop_class=LoopWithState):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(96, 6, generator=g)
    y = (x @ torch.randn(6, 3, generator=g)).argmax(1)
    torch.manual_seed(seed)
    model = torch.nn.Linear(6, 3)
    loop = loop_class(TrainingEpochs((x[:64], y[:64]), batch_size=64 // STEPS_PER_EPOCH),
                      ValidationBatches((x[64:], y[64:]), batch_size=16), torch.optim.Adam(model.parameters(), lr=0.05),
                      metrics=["accuracy"], callbacks=[ProgressPrinter(mode="plain", file=open(os.devnull, "w")), *callbacks])
    return loop, model


class Inject(Callback):
    "Overwrites this epoch's value of `name` in loop.history (order 0: before Checkpoint and EarlyStopping read it)."
    def __init__(self, name, values): self.name, self.values = name, values
    def epoch_end(self, loop): loop.history[-1][self.name] = self.values[loop.epoch_index]


class Interrupt(Callback):
    "Raises `error` at the training batch_start where `loop.step == step` (as Ctrl-C or SIGTERM would arrive)."
    def __init__(self, step, error=KeyboardInterrupt): self.step, self.error = step, error
    def batch_start(self, loop):
        if loop.phase == "training" and loop.step == self.step: raise self.error()


def steps_in(directory): return [checkpoint_step(p) for p in list_checkpoints(directory)]


# -- atomic writes -----------------------------------------------------------------------------------

def test_round_trip_keeps_tensors_and_rng_states(tmp_path):
    model = torch.nn.Linear(4, 2)
    state = {"model": model.state_dict(), "numpy": np.random.get_state(), "numpy_new": np.random.default_rng(3).bit_generator.state,
             "python": random.getstate(), "torch": torch.get_rng_state(), "nested": [1, 2.5, "x", None, (True, {"a": 1})]}
    loaded = load_checkpoint(save_checkpoint(state, tmp_path / "step-00000001.pt"))
    assert all(torch.equal(v, loaded["model"][k]) for k, v in model.state_dict().items())
    np.random.set_state(loaded["numpy"])  # numpy accepts it back
    assert loaded["python"] == state["python"] and loaded["nested"] == state["nested"] and loaded["numpy_new"] == state["numpy_new"]
    assert torch.equal(loaded["torch"], state["torch"])
    assert os.listdir(tmp_path) == ["step-00000001.pt"]
    assert zipfile.is_zipfile(tmp_path / "step-00000001.pt")  # still an ordinary PyTorch file
    assert torch.load(tmp_path / "step-00000001.pt", weights_only=False)["format"] == ckpt.CHECKPOINT_FORMAT


@pytest.mark.parametrize("error", [OSError("No space left on device"), KeyboardInterrupt()])
def test_failure_during_save_leaves_no_partial_file(tmp_path, monkeypatch, error):
    target = tmp_path / "step-00000005.pt"
    save_checkpoint({"version": "old"}, target)
    before = target.read_bytes()
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        real_save({"half": torch.zeros(1000)}, f)  # some bytes reach the temporary file first
        raise error
    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(type(error)): save_checkpoint({"version": "new"}, target)
    with pytest.raises(type(error)): save_checkpoint({"version": "new"}, tmp_path / "step-00000006.pt")
    assert sorted(os.listdir(tmp_path)) == ["step-00000005.pt"]  # no temporary file, no new name
    assert target.read_bytes() == before and load_checkpoint(target) == {"version": "old"}


def test_file_is_synced_before_rename_and_directory_after(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(("fsync", os.path.isdir(f"/proc/self/fd/{fd}"))), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append(("replace", os.path.basename(b))), real_replace(a, b)))
    save_checkpoint({"a": 1}, tmp_path / "best.pt")
    assert calls == [("fsync", False), ("replace", "best.pt"), ("fsync", True)]


def test_save_rejects_non_dict_and_creates_folders(tmp_path):
    with pytest.raises(TypeError, match="state dict"): save_checkpoint([1, 2], tmp_path / "x.pt")
    assert load_checkpoint(save_checkpoint({"a": 1}, tmp_path / "deep" / "er" / "best.pt")) == {"a": 1}


# -- refusing what is not an intact checkpoint ----------------------------------------------------------

@pytest.fixture
def good_file(tmp_path):
    return save_checkpoint({"model": torch.nn.Linear(50, 50).state_dict(), "step": 3}, tmp_path / "step-00000003.pt")


@pytest.mark.parametrize("cut", [0.0, 0.1, 0.5, 0.9, -1, -30])
def test_truncated_file_is_an_error_naming_it(good_file, cut):
    data = good_file.read_bytes()
    end = int(len(data) * cut) if cut >= 0 else len(data) + cut
    bad = good_file.with_name("cut.pt")
    bad.write_bytes(data[:end])
    with pytest.raises(CheckpointError, match=f"{bad}.*(truncated|cut short|empty)"): load_checkpoint(bad)


@pytest.mark.parametrize("where", [0.3, 0.5, 0.8])
def test_a_changed_byte_is_an_error_naming_the_file(good_file, where):
    data = bytearray(good_file.read_bytes())
    data[int(len(data) * where)] ^= 0x10
    bad = good_file.with_name("flipped.pt")
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{bad}.*(corrupt|truncated)"): load_checkpoint(bad)


def test_foreign_and_garbage_files_are_errors_naming_them(tmp_path):
    torch.save(torch.nn.Linear(3, 3).state_dict(), tmp_path / "state_dict.pt")
    torch.save(torch.ones(3), tmp_path / "tensor.pt")
    (tmp_path / "notes.pt").write_text("these are my notes about the run, not a checkpoint at all\n" * 3)
    (tmp_path / "empty.pt").write_bytes(b"")
    for name, why in [("state_dict.pt", "not a trainloop_nb checkpoint"), ("tensor.pt", "not a trainloop_nb checkpoint"),
                      ("notes.pt", "not a PyTorch file"), ("empty.pt", "empty")]:
        with pytest.raises(CheckpointError, match=f"{tmp_path / name}.*{why}"): load_checkpoint(tmp_path / name)


def test_intact_file_without_our_marker_or_from_a_newer_version(tmp_path, monkeypatch):
    save_checkpoint({"a": 1}, tmp_path / "ok.pt")
    monkeypatch.setattr(ckpt, "CHECKPOINT_FORMAT", "something.else")  # written with another marker: checksum fine, marker wrong
    save_checkpoint({"a": 1}, tmp_path / "other.pt")
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'other.pt'}.*no format marker"): load_checkpoint(tmp_path / "other.pt")
    monkeypatch.setattr(ckpt, "CHECKPOINT_VERSION", 99)
    save_checkpoint({"a": 1}, tmp_path / "future.pt")
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'future.pt'}.*version 99.*upgrade"): load_checkpoint(tmp_path / "future.pt")
    assert load_checkpoint(tmp_path / "ok.pt") == {"a": 1}


def test_objects_that_could_run_code_are_refused(tmp_path):
    # Not plain data: loading with weights_only refuses it instead of importing and calling a class.
    save_checkpoint({"thing": fractions.Fraction(1, 3)}, tmp_path / "custom.pt")
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'custom.pt'}.*could not load"): load_checkpoint(tmp_path / "custom.pt")


def test_missing_file_and_empty_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"): load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path} holds no checkpoint"): load_checkpoint(tmp_path)


# -- directories: newest, pruning ---------------------------------------------------------------------

def test_names_and_newest_by_step_not_by_time_or_name(tmp_path):
    assert checkpoint_name(0) == "step-00000000.pt" and checkpoint_name(123) == "step-00000123.pt"
    assert checkpoint_name(123_456_789) == "step-123456789.pt" and checkpoint_step("step-123456789.pt") == 123_456_789
    assert checkpoint_step("best.pt") is None and checkpoint_step("step-12.pt") is None
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="whole number"): checkpoint_name(bad)
    assert latest_checkpoint(tmp_path) is None and latest_checkpoint(tmp_path / "absent") is None
    for step in (100_000_000, 99_999_999, 20, 3):  # the oldest step is written last: file times would mislead
        save_checkpoint({"step": step}, tmp_path / checkpoint_name(step))
    save_checkpoint({"step": -1}, tmp_path / "best.pt")
    (tmp_path / "step-00000500.pt.bak").write_text("x")
    assert steps_in(tmp_path) == [3, 20, 99_999_999, 100_000_000]
    assert latest_checkpoint(tmp_path).name == "step-100000000.pt" and load_checkpoint(tmp_path)["step"] == 100_000_000


def test_prune_keeps_the_newest(tmp_path):
    for step in (5, 1, 40, 7, 12): save_checkpoint({"step": step}, tmp_path / checkpoint_name(step))
    save_checkpoint({"step": 1}, tmp_path / "best.pt")
    removed = prune_checkpoints(tmp_path, keep_last=2)
    assert [checkpoint_step(p) for p in removed] == [1, 5, 7] and steps_in(tmp_path) == [12, 40]
    assert (tmp_path / "best.pt").exists() and prune_checkpoints(tmp_path, keep_last=5) == []
    for bad in (0, -1, 2.0, None):
        with pytest.raises(ValueError, match="keep_last"): prune_checkpoints(tmp_path, bad)


# -- the callback ------------------------------------------------------------------------------------

def test_every_epoch_with_pruning(tmp_path):
    checkpoint = Checkpoint(tmp_path, keep_last=2)
    loop, model = make_loop([checkpoint])
    loop.fit(model, epochs=5, device="cpu")
    assert steps_in(tmp_path) == [16, 20] and checkpoint.last_saved == tmp_path / "step-00000020.pt"
    state = load_checkpoint(tmp_path)
    assert state["step"] == 20 and len(state["history"]) == 5  # written after the epoch's record
    assert all(torch.equal(v, state["model"][k]) for k, v in model.state_dict().items())
    assert set(os.listdir(tmp_path)) == {"step-00000016.pt", "step-00000020.pt"}


def test_every_steps_after_real_steps_only(tmp_path, monkeypatch):
    written, real_save = [], ckpt.save_checkpoint
    monkeypatch.setattr(ckpt, "save_checkpoint", lambda state, path: (written.append(os.path.basename(path)), real_save(state, path))[1])

    class CancelSome(Callback):  # cancelled batches make no optimizer step, so nothing may be saved for them
        def update_start(self, loop):
            if loop.epoch_index == 0 and loop.batch_index in (2, 3): raise CancelBatch()  # right after step 2
    loop, model = make_loop([CancelSome(), Checkpoint(tmp_path, every_steps=2, every_epochs=None, keep_last=None)])
    loop.fit(model, epochs=2, device="cpu")
    assert loop.step == 6 and written == ["step-00000002.pt", "step-00000004.pt", "step-00000006.pt"]
    assert steps_in(tmp_path) == [2, 4, 6] and load_checkpoint(tmp_path / "step-00000004.pt")["step"] == 4


def test_every_epochs_n(tmp_path):
    loop, model = make_loop([Checkpoint(tmp_path, every_epochs=2, keep_last=None)])
    loop.fit(model, epochs=5, device="cpu")
    assert steps_in(tmp_path) == [8, 16]


@pytest.mark.parametrize("mode,values,best_epoch", [
    ("auto", [0.5, 0.4, 0.45, 0.3, 0.3, 0.6], 4),  # valid_loss: lowest, first of ties
    ("max", [0.5, 0.4, 0.45, 0.3, 0.3, 0.6], 6),
    ("min", [0.5, 0.5, 0.5, 0.5, 0.5, 0.5], 1),
])
def test_best_follows_the_monitor(tmp_path, mode, values, best_epoch):
    best_steps = []

    class WatchBest(Callback):
        order = 200
        def epoch_end(self, loop):
            best_steps.append(load_checkpoint(tmp_path / "best.pt")["step"])
    checkpoint = Checkpoint(tmp_path, every_epochs=None, monitor="valid_loss", mode=mode)
    loop, model = make_loop([Inject("valid_loss", values), checkpoint, WatchBest()])
    loop.fit(model, epochs=len(values), device="cpu")
    assert load_checkpoint(tmp_path / "best.pt")["step"] == best_epoch * STEPS_PER_EPOCH
    assert checkpoint.best == values[best_epoch - 1] and list_checkpoints(tmp_path) == []
    assert load_checkpoint(tmp_path / "best.pt")["callbacks"]["Checkpoint"] == {"best": values[best_epoch - 1]}
    assert best_steps == sorted(best_steps)  # best.pt only ever moves forward to a better epoch


def test_missing_monitor_is_a_clear_error(tmp_path):
    loop, model = make_loop([Checkpoint(tmp_path, monitor="val_accuracy")])
    with pytest.raises(ValueError, match="Checkpoint monitors 'val_accuracy'.*'valid_accuracy'"): loop.fit(model, epochs=1, device="cpu")


@pytest.mark.parametrize("error", [KeyboardInterrupt, SystemExit])
def test_interrupt_writes_the_last_completed_step(tmp_path, error):
    loop, model = make_loop([Checkpoint(tmp_path, keep_last=5), Interrupt(step=6, error=error)])
    with pytest.raises(error): loop.fit(model, epochs=3, device="cpu")
    assert steps_in(tmp_path) == [4, 6]
    state = load_checkpoint(tmp_path)
    assert state["step"] == 6 and all(torch.equal(v, state["model"][k]) for k, v in model.state_dict().items())


def test_other_errors_write_nothing_extra(tmp_path):
    loop, model = make_loop([Checkpoint(tmp_path), Interrupt(step=6, error=lambda: RuntimeError("bug"))])
    with pytest.raises(RuntimeError, match="bug"): loop.fit(model, epochs=3, device="cpu")
    assert steps_in(tmp_path) == [4]


def test_only_rank_zero_writes(tmp_path):
    class RankOne(LoopWithState):  # properties, so a loop that sets its own rank cannot undo it
        rank = property(lambda self: 1, lambda self, value: None)
        world_size = property(lambda self: 2, lambda self, value: None)
    loop, model = make_loop([Checkpoint(tmp_path, every_steps=1, monitor="valid_loss"), Interrupt(step=3)], loop_class=RankOne)
    with pytest.raises(KeyboardInterrupt): loop.fit(model, epochs=2, device="cpu")
    assert not tmp_path.exists() or os.listdir(tmp_path) == []


def test_refuses_a_directory_with_newer_checkpoints(tmp_path):
    loop, model = make_loop([Checkpoint(tmp_path)])
    loop.fit(model, epochs=2, device="cpu")
    loop, model = make_loop([Checkpoint(tmp_path)])
    with pytest.raises(ValueError, match=r"up to step-00000008.pt, past step 0.*resume_from=.*delete them"):
        loop.fit(model, epochs=1, device="cpu")
    assert steps_in(tmp_path) == [4, 8]  # untouched


def test_leftover_temporary_files_are_cleaned_at_fit_start(tmp_path):
    (tmp_path / ".step-00000004.pt.abc123.tmp").write_bytes(b"half")
    (tmp_path / ".best.pt.x.tmp").write_bytes(b"half")
    (tmp_path / ".someone-elses.tmp").write_bytes(b"keep")
    loop, model = make_loop([Checkpoint(tmp_path)])
    loop.fit(model, epochs=1, device="cpu")
    assert sorted(os.listdir(tmp_path)) == [".someone-elses.tmp", "step-00000004.pt"]


def test_loop_without_state_dict_is_a_clear_error(tmp_path):
    class NoState(TrainingLoop):
        state_dict = None
    loop, model = make_loop([Checkpoint(tmp_path)], loop_class=NoState)
    with pytest.raises(TypeError, match=r"loop.state_dict\(\)"): loop.fit(model, epochs=1, device="cpu")


def test_saves_early_stopping_state_of_the_same_epoch(tmp_path):
    values = [1.0, 0.5, 0.75, 0.875, 0.25, 0.5]
    loop, model = make_loop([Inject("valid_loss", values), Checkpoint(tmp_path, keep_last=None), EarlyStopping(patience=10)])
    loop.fit(model, epochs=len(values), device="cpu")
    waits = [load_checkpoint(p)["callbacks"]["EarlyStopping"]["wait"] for p in list_checkpoints(tmp_path)]
    assert waits == [0, 0, 1, 2, 0, 1]  # each includes its own epoch: Checkpoint runs after EarlyStopping
    best = load_checkpoint(tmp_path)["callbacks"]["EarlyStopping"]["best_weights"]
    assert all(t.device.type == "cpu" for t in best.values())


def test_resumed_state_keeps_best(tmp_path):
    checkpoint = Checkpoint(tmp_path, monitor="valid_loss")
    checkpoint.load_state_dict({"best": 0.1})
    loop, model = make_loop([Inject("valid_loss", [0.2, 0.05]), checkpoint])
    loop.fit(model, epochs=2, device="cpu")
    assert load_checkpoint(tmp_path / "best.pt")["step"] == 8  # 0.2 did not beat the resumed best, 0.05 did
    with pytest.raises(ValueError, match="best"): checkpoint.load_state_dict({})


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(every_steps=0), ValueError, "every_steps"), (dict(every_steps=2.5), ValueError, "every_steps"),
    (dict(every_epochs=0), ValueError, "every_epochs"), (dict(every_epochs=True), ValueError, "every_epochs"),
    (dict(keep_last=0), ValueError, "keep_last"), (dict(keep_last=-2), ValueError, "keep_last"),
    (dict(mode="max"), ValueError, "give monitor="), (dict(monitor="valid_loss", mode="lowest"), ValueError, "mode must be one of"),
    (dict(monitor=""), ValueError, "monitor must name"),
])
def test_bad_arguments(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match): Checkpoint(tmp_path, **kwargs)


def test_directory_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"): Checkpoint(tmp_path / "file")
