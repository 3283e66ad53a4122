"""The promises hold whatever a user's loader, model or callbacks do, and a resume is exact or refused.

Exact metrics through `TrainingLoop` with buffers refilled in place (issue 18); `loop.resume()` and `resume_from` with
the fit's options; data that restores its own position (torchdata's StatefulDataLoader) resumed without a replay;
a resume with a changed set-up refused before anything is loaded; Ctrl-C inside an accumulation group and a second
Ctrl-C inside a step; a label out of range named with its batch (issue 19).
"""
from __future__ import annotations

import copy
import signal

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score

from trainloop_nb.callbacks.checkpoint import Checkpoint, CheckpointError, latest_checkpoint, list_checkpoints
from trainloop_nb.core import Callback
from trainloop_nb.data import TrainingEpochs, ValidationBatches
from trainloop_nb.loop import TrainingLoop

pytestmark = [pytest.mark.filterwarnings("ignore:.*holds the state of a callback Checkpoint:UserWarning"),
              pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")]  # torchdata 0.11 calls a deprecated torch API


def toy(samples=96, features=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, features, generator=g)
    return x, (x[:, 0] - x[:, 1] > 0).long()


def dropout_model(seed=1):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 12), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(12, 2))


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def without_time(history):
    return [{k: v for k, v in record.items() if k != "time"} for record in history]


class StopAt(Callback):
    "Raises `error` at the first batch_end where the loop has made `step` steps."
    order = 50
    def __init__(self, step, error=RuntimeError): self.step, self.error, self.done = step, error, False
    def batch_end(self, loop):
        if not self.done and loop.phase == "training" and loop.step == self.step:
            self.done = True
            raise self.error(f"stopped at step {self.step}")


# --- exact metrics whatever happens to a tensor after its batch ----------------------------------------------------------
class RefilledTargets:
    "A loader that refills one input and one target buffer for every batch, as a prefetcher does (through numpy)."
    def __init__(self, x, y, batch_size):
        self.x, self.y, self.batch_size = x, y, batch_size
        self.x_buffer, self.y_array = torch.empty(batch_size, x.shape[1]), np.empty(batch_size, dtype=np.int64)
        self.y_buffer = torch.from_numpy(self.y_array)  # numpy writes bump no version counter
    def __len__(self): return len(self.x) // self.batch_size
    def __iter__(self):
        for i in range(len(self)):
            part = slice(i * self.batch_size, (i + 1) * self.batch_size)
            self.x_buffer.copy_(self.x[part])
            self.y_array[:] = self.y[part].numpy()
            yield self.x_buffer, self.y_buffer


class StaticOutput(torch.nn.Module):
    "A model that writes its logits into one persistent buffer (static-output and CUDA-graph code do)."
    def __init__(self, model):
        super().__init__()
        self.model, self.out = model, None
    def forward(self, x):
        result = self.model(x)
        if self.out is None or self.out.shape != result.shape: self.out = torch.empty_like(result)
        with torch.no_grad(): self.out.copy_(result)
        return self.out + (result - result.detach())  # the buffer's values, the model's gradients


class ScribbleOnOutput(Callback):
    "Changes the batch's output in place after the loop counted it."
    def batch_end(self, loop): loop.last_step_output.detach().fill_(0.0)


class RecordPredictions(Callback):
    "The oracle: each validation batch's predictions and targets, copied at inference_prediction_end."
    def __init__(self): self.pred, self.true = [], []
    def inference_prediction_end(self, loop):
        self.pred.append(loop.last_step_output.argmax(1).clone())
        self.true.append(loop.last_step_target.clone())


@pytest.mark.parametrize("case", ["refilled target buffer", "persistent output buffer", "output changed at batch_end"])
def test_validation_accuracy_is_exact_whatever_happens_to_a_tensor_after_its_batch(case):
    x, y = toy(samples=400)
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 2)
    validation = RefilledTargets(x, y, 4) if case == "refilled target buffer" else ValidationBatches((x, y), 4)
    if case == "persistent output buffer": model = StaticOutput(model)
    oracle = RecordPredictions()
    extra = [ScribbleOnOutput()] if case == "output changed at batch_end" else []
    loop = TrainingLoop(TrainingEpochs((x, y), batch_size=8), validation, torch.optim.SGD(model.parameters(), lr=0.05),
                        metrics=["accuracy"], callbacks=[oracle, *extra], include_default_callbacks=False)
    history = loop.fit(model, epochs=1)
    truth = accuracy_score(torch.cat(oracle.true), torch.cat(oracle.pred))
    assert len(oracle.pred) == 100 and history[0]["valid_accuracy"] == pytest.approx(truth, abs=1e-12)


# --- resume keeps the fit's options ----------------------------------------------------------------------------------------
def options_run(callbacks=(), **options):
    x, y = toy()
    model = dropout_model()
    loop = TrainingLoop(TrainingEpochs((x[:80], y[:80]), batch_size=4, seed=2), ValidationBatches((x[80:], y[80:]), 8),
                        torch.optim.Adam(model.parameters(), lr=0.01), metrics=["accuracy"], callbacks=list(callbacks),
                        include_default_callbacks=False)
    return loop, model


@pytest.mark.parametrize("options", [dict(accumulate_steps=4), dict(precision="bf16-mixed")], ids=["accumulate", "bf16"])
def test_resume_continues_with_the_fits_own_options(options):
    reference, ref_model = options_run()
    ref_history = reference.fit(ref_model, epochs=2, **options)
    loop, model = options_run([StopAt(3)])
    with pytest.raises(RuntimeError, match="stopped at step 3"): loop.fit(model, epochs=2, **options)
    history = loop.resume()
    assert loop.step == reference.step and same_weights(model, ref_model)
    assert without_time(history) == without_time(ref_history)


def test_resume_from_with_other_options_names_each_and_loads_nothing(tmp_path):
    loop, model = options_run([Checkpoint(tmp_path, every_steps=2)])
    loop.fit(model, epochs=1, accumulate_steps=4, precision="bf16-mixed")
    fresh, fresh_model = options_run()
    before = copy.deepcopy(fresh_model.state_dict())
    with pytest.raises(CheckpointError) as caught: fresh.fit(fresh_model, epochs=2, resume_from=tmp_path)
    message = str(caught.value)
    assert "precision: the run used 'bf16-mixed', this fit asks for '32'" in message
    assert "accumulate_steps: the run used 4, this fit asks for 1" in message and "nothing was loaded" in message
    assert all(torch.equal(v, before[k]) for k, v in fresh_model.state_dict().items())


# --- data that restores its own position --------------------------------------------------------------------------------
class CountingDataset(torch.utils.data.TensorDataset):
    "Counts the samples read (in this process: num_workers=0)."
    def __init__(self, *tensors): super().__init__(*tensors); self.reads = 0
    def __getitem__(self, index):
        self.reads += 1
        return super().__getitem__(index)


def stateful_run(num_workers, callbacks=()):
    from torchdata.stateful_dataloader import StatefulDataLoader
    x, y = toy()
    dataset = CountingDataset(x[:80], y[:80])
    loader = StatefulDataLoader(dataset, batch_size=4, shuffle=True, num_workers=num_workers,
                                generator=torch.Generator().manual_seed(5))
    model = dropout_model()
    loop = TrainingLoop(loader, ValidationBatches((x[80:], y[80:]), 8), torch.optim.Adam(model.parameters(), lr=0.01),
                        metrics=["accuracy"], callbacks=list(callbacks), include_default_callbacks=False)
    return loop, model, dataset


@pytest.mark.parametrize("num_workers", [0, 2])
def test_stateful_dataloader_resumes_from_its_own_state_without_a_replay(tmp_path, num_workers):
    pytest.importorskip("torchdata")
    reference, ref_model, _ = stateful_run(num_workers)
    ref_history = reference.fit(ref_model, epochs=2)
    loop, model, _ = stateful_run(num_workers, [Checkpoint(tmp_path, every_steps=7), StopAt(9)])
    with pytest.raises(RuntimeError): loop.fit(model, epochs=2)
    assert latest_checkpoint(tmp_path).name == "step-00000007.pt"  # inside the first epoch of 20 batches
    resumed, resumed_model, dataset = stateful_run(num_workers)
    history = resumed.fit(resumed_model, epochs=2, resume_from=tmp_path)
    assert same_weights(resumed_model, ref_model) and without_time(history) == without_time(ref_history)
    if num_workers == 0: assert dataset.reads == 80 - 7 * 4 + 80  # the rest of epoch 1, then epoch 2: nothing replayed


def test_stateful_dataloader_stopped_inside_a_batch_resumes_in_memory_with_that_batch():
    pytest.importorskip("torchdata")
    class FailInsideBatch(Callback):
        def __init__(self): self.done = False
        def update_start(self, loop):
            if not self.done and loop.step == 5: self.done = True; raise RuntimeError("inside the batch")
    reference, ref_model, _ = stateful_run(0)
    reference.fit(ref_model, epochs=2)
    loop, model, dataset = stateful_run(0, [FailInsideBatch()])
    with pytest.raises(RuntimeError, match="inside the batch"): loop.fit(model, epochs=2)
    loop.resume()
    assert same_weights(model, ref_model) and dataset.reads == 160  # every sample of both epochs read once


# --- a changed set-up is refused before anything is loaded --------------------------------------------------------------
def setup_run(metrics=("accuracy", "mcc"), batch_size=16, optimizer=torch.optim.SGD, callbacks=()):
    x, y = toy()
    model = dropout_model()
    kwargs = dict(lr=0.05, momentum=0.9) if optimizer is torch.optim.SGD else dict(lr=0.01)
    loop = TrainingLoop(TrainingEpochs((x[:80], y[:80]), batch_size=batch_size, seed=1), ValidationBatches((x[80:], y[80:]), 8),
                        optimizer(model.parameters(), **kwargs), metrics=list(metrics), callbacks=list(callbacks),
                        include_default_callbacks=False)
    return loop, model


@pytest.fixture
def mid_epoch_checkpoint(tmp_path):
    "A run stopped inside its second epoch's training, after a checkpoint at step 7 (epoch 2, batch 2 of 5)."
    loop, model = setup_run(callbacks=[Checkpoint(tmp_path, every_steps=7), StopAt(8)])
    with pytest.raises(RuntimeError): loop.fit(model, epochs=3)
    return latest_checkpoint(tmp_path)


def test_metrics_in_another_order_resume_by_name(mid_epoch_checkpoint):
    reference, ref_model = setup_run()
    ref_history = reference.fit(ref_model, epochs=3)
    loop, model = setup_run(metrics=("mcc", "accuracy"))
    history = loop.fit(model, epochs=3, resume_from=mid_epoch_checkpoint)
    assert same_weights(model, ref_model)
    assert [{k: r[k] for k in sorted(r) if k != "time"} for r in history] == \
           [{k: r[k] for k in sorted(r) if k != "time"} for r in ref_history]


@pytest.mark.parametrize("change, expected", [
    (dict(metrics=("accuracy",)), r"gone: \['mcc'\]"),
    (dict(metrics=("accuracy", "mcc", "top5_accuracy")), r"new: \['top5_accuracy'\]"),
    (dict(batch_size=8), r"batches of 16 samples, but this training data has batch_size=8"),
    (dict(batch_size=32), r"batches of 16 samples, but this training data has batch_size=32"),
    (dict(optimizer=torch.optim.Adam), r"state of a SGD optimizer, but this loop's is a Adam"),
])
def test_a_changed_set_up_is_refused_naming_both_and_nothing_is_loaded(mid_epoch_checkpoint, change, expected):
    loop, model = setup_run(**change)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(CheckpointError, match=expected) as caught: loop.fit(model, epochs=3, resume_from=mid_epoch_checkpoint)
    assert "nothing was loaded" in str(caught.value) and mid_epoch_checkpoint.name in str(caught.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) and loop.optimizer.state == {}


@pytest.mark.parametrize("epochs, expected", [(1, "inside epoch 2 of its run, past the 1 epochs"),
                                              (2, None)])
def test_fewer_epochs_than_the_run_reached_is_refused(mid_epoch_checkpoint, epochs, expected):
    loop, model = setup_run()
    if expected is None:  # the checkpoint is inside epoch 2: fit(epochs=2) finishes that epoch
        assert len(loop.fit(model, epochs=epochs, resume_from=mid_epoch_checkpoint)) == 2
        return
    with pytest.raises(CheckpointError, match=expected): loop.fit(model, epochs=epochs, resume_from=mid_epoch_checkpoint)


# --- signals: whole accumulation groups, and a second Ctrl-C ---------------------------------------------------------------
class SignalAt(Callback):
    "Sends this process SIGINT `times` times at the `event` of the `batch`-th training batch (1-based, first epoch)."
    def __init__(self, event, batch, times=1):
        self.batch, self.times, self.sent = batch, times, False
        setattr(self, event, self._send)
    def _send(self, loop):
        if self.sent or loop.phase != "training" or loop.batch_index + 1 != self.batch: return
        self.sent = True
        for _ in range(self.times): signal.raise_signal(signal.SIGINT)


def test_ctrl_c_inside_an_accumulation_group_stops_at_the_groups_step(tmp_path, ctrl_c_raises):
    reference, ref_model = options_run()
    reference.fit(ref_model, epochs=2, accumulate_steps=4)
    loop, model = options_run([SignalAt("batch_end", batch=6), Checkpoint(tmp_path, every_steps=100)])
    with pytest.raises(KeyboardInterrupt): loop.fit(model, epochs=2, accumulate_steps=4)
    assert loop.step == 2 and loop.batch_index == 7  # held to the end of the group of batches 5-8, which stepped
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002.pt"]
    resumed, resumed_model = options_run()
    resumed.fit(resumed_model, epochs=2, accumulate_steps=4, resume_from=tmp_path)
    assert same_weights(resumed_model, ref_model)


def test_a_second_ctrl_c_inside_a_step_writes_no_checkpoint_and_says_why(tmp_path, ctrl_c_raises):
    loop, model = options_run([SignalAt("update_start", batch=3, times=2), Checkpoint(tmp_path, every_steps=100)])
    with pytest.raises(KeyboardInterrupt) as caught: loop.fit(model, epochs=1)
    notes = " ".join(getattr(caught.value, "__notes__", []))
    assert "second Ctrl-C" in notes and "may be half applied" in notes
    assert list_checkpoints(tmp_path) == []
    with pytest.raises(RuntimeError, match="no stopped fit"): loop.resume()


# --- a label out of range -------------------------------------------------------------------------------------------------
def test_a_label_out_of_range_names_the_batch_and_the_class_count():
    x, y = toy()
    y = y.clone()
    y[37] = 4  # in the third batch of 16
    model = torch.nn.Linear(5, 3)
    loop = TrainingLoop(TrainingEpochs((x, y), batch_size=16, shuffle=False), None, torch.optim.SGD(model.parameters(), lr=0.1),
                        include_default_callbacks=False)
    with pytest.raises(IndexError) as caught: loop.fit(model, epochs=1)
    assert any("training batch 3" in n and "scores 3 classes" in n and "from 0 to 2" in n for n in caught.value.__notes__)


# --- a full disk under the CSV log: the file is closed and the run can be resumed ------------------------------------
def test_a_log_write_failing_with_a_full_disk_keeps_the_run_resumable(tmp_path):
    import errno
    import pandas as pd
    from trainloop_nb.callbacks.logging import CSVLogger
    csv = CSVLogger(tmp_path / "log.csv")
    class DiskFills(Callback):
        "At step 5 the disk is full: the CSV logger's next row fails with ENOSPC."
        order = -5
        def batch_start(self, loop):
            if loop.step != 5 or loop.phase != "training": return
            class Full:
                def writerow(self, row): raise OSError(errno.ENOSPC, "No space left on device")
            csv.writer = Full()
    reference, ref_model = setup_run()
    reference.fit(ref_model, epochs=2)
    loop, model = setup_run(callbacks=[DiskFills(), csv])
    with pytest.raises(OSError, match="No space left"): loop.fit(model, epochs=2)
    assert csv.file is None  # closed by fit_end
    loop.user_callbacks = [csv]  # the disk has room again
    history = loop.resume()
    assert len(history) == 2 and same_weights(model, ref_model)
    rows = pd.read_csv(tmp_path / "log.csv")
    assert len(rows) == 2 * (5 + 2)  # 5 training and 2 validation batches an epoch, each row once
