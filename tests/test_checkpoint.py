"""Checkpoint files and the Checkpoint callback: atomic writes under failure, pruning, best.pt, and refusing bad files."""
from __future__ import annotations

import collections
import datetime
import enum
import errno
import fractions
import hashlib
import io
import json
import math
import os
import pathlib
import random
import re
import socket
import subprocess
import sys
import warnings
import zipfile

import numpy as np
import pytest
import torch

import trainloop_nb.callbacks.checkpoint as ckpt
import trainloop_nb.checkpoint_io as ckpt_io
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


def make_loop(callbacks=(), seed=0, loop_class=LoopWithState, model=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(96, 6, generator=g)
    y = (x @ torch.randn(6, 3, generator=g)).argmax(1)
    torch.manual_seed(seed)
    model = torch.nn.Linear(6, 3) if model is None else model
    loop = loop_class(TrainingEpochs((x[:64], y[:64]), batch_size=64 // STEPS_PER_EPOCH),
                      ValidationBatches((x[64:], y[64:]), batch_size=16), torch.optim.Adam(model.parameters(), lr=0.05),
                      metrics=["accuracy"], callbacks=[ProgressPrinter(mode="plain", file=open(os.devnull, "w")), *callbacks])
    return loop, model


class Inject(Callback):
    "Overwrites this epoch's value of `name` in loop.history (order 0: before Checkpoint and EarlyStopping read it)."
    def __init__(self, name, values): self.name, self.values = name, values
    def record_added(self, loop): loop.history[-1][self.name] = self.values[loop.epoch_index]


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
    assert torch.load(tmp_path / "step-00000001.pt", weights_only=False)["format"] == ckpt_io.CHECKPOINT_FORMAT


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


class FullAfter:
    "A file that takes `room` bytes and then fails as a full disk does."
    def __init__(self, file, room): self.file, self.room = file, room
    def write(self, data):
        if len(data) > self.room: raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)
    def __getattr__(self, name): return getattr(self.file, name)
    def __enter__(self): return self
    def __exit__(self, *exc): self.file.close()


@pytest.mark.parametrize("disk", ["/dev/full", "a write that fails"])
def test_a_full_disk_says_so_and_names_the_file(tmp_path, monkeypatch, disk):
    target = tmp_path / "step-00000005.pt"
    save_checkpoint({"version": "old"}, target)
    real_fdopen = os.fdopen
    if disk == "/dev/full":  # the kernel's own ENOSPC, met by torch.save's writer as on a full disk
        if not os.path.exists(disk): pytest.skip("no /dev/full on this system")
        def fdopen(fd, mode):
            os.close(fd)
            return open(disk, mode)
    else:
        def fdopen(fd, mode): return FullAfter(real_fdopen(fd, mode), room=1000)
    monkeypatch.setattr(os, "fdopen", fdopen)
    with pytest.raises(OSError) as info: save_checkpoint({"model": torch.nn.Linear(50, 50).state_dict()}, target)
    assert info.value.errno == errno.ENOSPC and "no space left on device" in str(info.value).lower()
    assert str(target) in str(info.value)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["step-00000005.pt"]  # no temporary file; the earlier file untouched
    assert load_checkpoint(target) == {"version": "old"}


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
    monkeypatch.setattr(ckpt_io, "CHECKPOINT_FORMAT", "something.else")  # written with another marker: checksum fine, marker wrong
    save_checkpoint({"a": 1}, tmp_path / "other.pt")
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'other.pt'}.*no format marker"): load_checkpoint(tmp_path / "other.pt")
    monkeypatch.setattr(ckpt_io, "CHECKPOINT_VERSION", 99)
    save_checkpoint({"a": 1}, tmp_path / "future.pt")
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'future.pt'}.*version 99.*upgrade"): load_checkpoint(tmp_path / "future.pt")
    assert load_checkpoint(tmp_path / "ok.pt") == {"a": 1}


def write_unchecked(state, path):
    "A checkpoint file as save_checkpoint wrote it before it checked what a state holds (torch.save, then the checksum)."
    buffer = io.BytesIO()
    torch.save({"format": ckpt_io.CHECKPOINT_FORMAT, "version": ckpt_io.CHECKPOINT_VERSION, "state": state}, buffer)
    data = buffer.getvalue()
    path.write_bytes(data + b"TLNB-CHECKPOINT1" + hashlib.sha256(data).digest())


def test_objects_that_could_run_code_are_refused(tmp_path):
    # Not plain data: loading with weights_only refuses it instead of importing and calling a class.
    write_unchecked({"thing": fractions.Fraction(1, 3)}, tmp_path / "custom.pt")
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'custom.pt'}.*could not load") as info:
        load_checkpoint(tmp_path / "custom.pt")
    assert "GLOBAL fractions.Fraction" in str(info.value)  # PyTorch's own line that names the type is kept


class Color(enum.Enum):
    RED = 1


class Holding(Callback):
    "A callback whose state holds `value`, two levels down."
    def __init__(self, value): self.value = value
    def state_dict(self): return {"kept": [1, {"value": self.value}]}
    def load_state_dict(self, state): pass


@pytest.mark.parametrize("value", [datetime.datetime(2025, 3, 1, 9, 30), pathlib.Path("run/data"), Color.RED,
                                   collections.deque([0.5, 0.25])], ids=["datetime", "Path", "enum", "deque"])
def test_a_state_that_could_not_be_loaded_is_refused_at_save_time(tmp_path, value):
    kind = type(value)
    loop, model = make_loop([Holding(value), Checkpoint(tmp_path, every_steps=1)], loop_class=TrainingLoop)
    with pytest.raises(TypeError) as info: loop.fit(model, epochs=1, device="cpu")
    message = str(info.value)
    assert f"callback 'Holding'" in message and "state['callbacks']['Holding']['kept'][1]['value']" in message
    assert f"{kind.__module__}.{kind.__qualname__}" in message and "weights_only=True" in message
    assert "tensors, numbers, str, bool, None, lists, tuples and dicts of them, and numpy arrays" in message
    assert os.listdir(tmp_path) == []  # nothing written, no temporary file, the lock let go
    fine = {"fine": [np.arange(3), np.float64(0.5), {"a": (None, True, b"x", 2.5j)}, torch.Size([2]), torch.float16]}
    assert str(load_checkpoint(save_checkpoint(fine, tmp_path / "ok.pt"))) == str(fine)  # what loads is not refused


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


def test_every_steps_after_real_steps_only(tmp_path):

    class CancelSome(Callback):  # cancelled batches make no optimizer step, so nothing may be saved for them
        def update_start(self, loop):
            if loop.epoch_index == 0 and loop.batch_index in (2, 3): raise CancelBatch()  # right after step 2
    loop, model = make_loop([CancelSome(), Checkpoint(tmp_path, every_steps=2, every_epochs=None, keep_last=None)])
    loop.fit(model, epochs=2, device="cpu")
    assert loop.step == 6  # keep_last=None: every file written is still there
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
    assert steps_in(tmp_path) == [4] and not (tmp_path / ".lock").exists()  # let go of after an error too


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
    assert steps_in(tmp_path) == [4, 8] and not (tmp_path / ".lock").exists()  # untouched; let go of


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
    (dict(every_epochs=None), ValueError, r"would never write.*every_epochs=N.*every_steps=N.*monitor="),
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


# -- never only bad checkpoints ------------------------------------------------------------------------

class NanFrom(torch.nn.Linear):
    "A linear layer whose training output is nan from the batch that makes step `step` on, as in a diverging run."
    def __init__(self, step):
        super().__init__(6, 3)
        self.step, self.calls = step, 0
    def forward(self, x):
        if self.training: self.calls += 1
        output = super().forward(x)
        return output * math.nan if self.training and self.calls >= self.step else output


def test_a_nonfinite_loss_never_leaves_only_bad_checkpoints(tmp_path):
    # The loss is nan from step 5 on (epoch 2); the loop stops at the end of epoch 2's training. Saving every 2
    # steps and keeping 2, steps 6 and 8 would have pruned 2 and 4 and left only nan weights.
    torch.manual_seed(0)
    loop, model = make_loop([Checkpoint(tmp_path, every_steps=2, keep_last=2)], model=NanFrom(step=5),
                            loop_class=TrainingLoop)
    with pytest.warns(UserWarning, match="wrote nothing at step 6: .*not .*finite") as warned:
        with pytest.raises(FloatingPointError, match="step 5"): loop.fit(model, epochs=3, device="cpu")
    assert len([w for w in warned if "wrote nothing" in str(w.message)]) == 1  # said once
    assert not all(p.isfinite().all() for p in model.parameters())  # the run itself did go bad
    newest = load_checkpoint(tmp_path)
    assert newest["step"] == 4 and steps_in(tmp_path) == [2, 4]  # from before the first non-finite step
    assert all(t.isfinite().all() for t in newest["model"].values())


@pytest.mark.parametrize("event", ["epoch_start", "training_start"])
def test_a_stop_before_the_epoch_has_a_training_loss_still_writes_its_checkpoint(tmp_path, event):
    # The training metrics of epoch 2 are empty there (their mean is nan): that is no reason to skip the save.
    def stop(loop, at):
        if at == event and loop.epoch_index == 1: raise KeyboardInterrupt
    loop, model = make_loop([stop, Checkpoint(tmp_path, every_steps=3, every_epochs=None, keep_last=None)],
                            loop_class=TrainingLoop)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Checkpoint wrote nothing")  # no such warning either
        with pytest.raises(KeyboardInterrupt): loop.fit(model, epochs=2, device="cpu")
    assert steps_in(tmp_path) == [3, 4] and load_checkpoint(tmp_path)["step"] == 4


# -- one writer per directory ------------------------------------------------------------------------------

def test_a_second_loop_writing_to_the_same_directory_is_refused(tmp_path):
    second = {}

    class StartAnother(Callback):
        "At the first batch of this fit (nothing saved yet), starts a second fit writing to the same directory."
        def batch_start(self, loop):
            if loop.step == 0 and "error" not in second:
                other, other_model = make_loop([Checkpoint(tmp_path)], seed=1)
                try: other.fit(other_model, epochs=1, device="cpu")
                except RuntimeError as error: second["error"] = error
                else: second["error"] = None
    loop, model = make_loop([StartAnother(), Checkpoint(tmp_path, keep_last=None)])
    loop.fit(model, epochs=2, device="cpu")
    message = str(second["error"])
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in message and "this process" in message
    assert "since" in message and str(tmp_path / ".lock") in message and "another directory" in message
    assert steps_in(tmp_path) == [4, 8] and not (tmp_path / ".lock").exists()
    newest = load_checkpoint(tmp_path)  # the first loop's own, untouched by the second
    assert all(torch.equal(v, newest["model"][k]) for k, v in model.state_dict().items())


HOLDER = """
import sys
import torch
from trainloop_nb.callbacks.checkpoint import Checkpoint
from trainloop_nb.loop import TrainingLoop

def hold(loop, event):  # at the first batch, with the directory locked: wait for the test to say go on
    if event == "batch_start" and loop.step == 0:
        print("holding", flush=True)
        sys.stdin.readline()

model = torch.nn.Linear(3, 2)
loop = TrainingLoop([(torch.randn(8, 3), torch.randint(0, 2, (8,)))], optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                    callbacks=[hold, Checkpoint(sys.argv[1])], include_default_callbacks=False)
loop.fit(model, epochs=1, device="cpu")
"""


def test_a_second_process_is_refused_and_its_temporary_files_are_left_alone(tmp_path):
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(ckpt.__file__)))  # the trainloop_nb this test imports
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")])}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline() == "holding\n", holder.stderr.read()
        in_flight = tmp_path / ".step-00000001.pt.x1y2z3.tmp"  # as if the holder were saving right now
        in_flight.write_bytes(b"half")
        loop, model = make_loop([Checkpoint(tmp_path)])
        host = re.escape(socket.gethostname())
        with pytest.raises(RuntimeError, match=rf"in use.*pid {holder.pid} on host {host}, since .*delete"):
            loop.fit(model, epochs=1, device="cpu")
        assert in_flight.exists() and (tmp_path / ".lock").exists()  # the other writer's files are left alone
        out, err = holder.communicate("go on\n", timeout=300)
        assert holder.returncode == 0, err
    finally:
        if holder.poll() is None: holder.kill()
    assert not (tmp_path / ".lock").exists() and steps_in(tmp_path) == [1]
    (tmp_path / "step-00000001.pt").unlink()
    loop, model = make_loop([Checkpoint(tmp_path)])
    loop.fit(model, epochs=1, device="cpu")  # free again: this fit takes the directory and clears what was left
    assert sorted(os.listdir(tmp_path)) == ["step-00000004.pt"]


def test_a_lock_left_by_a_killed_process_is_taken_over_with_a_warning(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid now names no process
    lock = {"pid": gone.pid, "host": socket.gethostname(), "since": "2025-03-01T09:30:00+00:00"}
    (tmp_path / ".lock").write_text(json.dumps(lock))
    loop, model = make_loop([Checkpoint(tmp_path)])
    with pytest.warns(UserWarning, match=rf"left by pid {gone.pid} on this host.*no longer runs"):
        loop.fit(model, epochs=1, device="cpu")
    assert sorted(os.listdir(tmp_path)) == ["step-00000004.pt"]


def test_a_lock_from_another_host_is_never_taken_over(tmp_path):
    lock = {"pid": 1, "host": "node-7.elsewhere", "since": "2025-03-01T09:30:00+00:00"}
    (tmp_path / ".lock").write_text(json.dumps(lock))
    loop, model = make_loop([Checkpoint(tmp_path)])
    with pytest.raises(RuntimeError, match=r"pid 1 on host node-7.elsewhere, since 2025-03-01T09:30:00"):
        loop.fit(model, epochs=1, device="cpu")
    assert json.loads((tmp_path / ".lock").read_text()) == lock and steps_in(tmp_path) == []


# -- early stopping: the stopping epoch is saved, and that run is finished ------------------------------------

def test_the_epoch_where_early_stopping_stops_is_checkpointed_and_resumes_finished(tmp_path):
    values = [1.0, 0.5, 0.6, 0.7, 0.8, 0.9]  # patience 2: stops at the end of epoch 4
    loop, model = make_loop([Inject("valid_loss", values), EarlyStopping(patience=2), Checkpoint(tmp_path, keep_last=None)],
                            loop_class=TrainingLoop)
    history = loop.fit(model, epochs=6, device="cpu")
    assert len(history) == 4 and steps_in(tmp_path) == [4, 8, 12, 16]
    state = load_checkpoint(tmp_path)
    assert state["step"] == 16 and state["callbacks"]["EarlyStopping"]["stopped_epoch"] == 4
    resumed_loop, resumed_model = make_loop([EarlyStopping(patience=2), Checkpoint(tmp_path, keep_last=None)], seed=1,
                                            loop_class=TrainingLoop)
    resumed = resumed_loop.fit(resumed_model, epochs=6, device="cpu", resume_from=tmp_path)
    assert resumed == history and resumed_loop.step == 16 and steps_in(tmp_path) == [4, 8, 12, 16]  # no further epoch
    assert all(torch.equal(v, resumed_model.state_dict()[k]) for k, v in model.state_dict().items())  # epoch 2's weights
