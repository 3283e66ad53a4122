"""CSVLogger and TensorBoardLogger: files read back with independent readers (csv, pandas, TensorBoard's EventAccumulator)."""
from __future__ import annotations

import csv
import errno
import math
import os
import sys
from datetime import datetime

import pandas as pd
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import trainloop_nb.callbacks.logging as tl_logging
from trainloop_nb.core import Callback, CancelBatch
from trainloop_nb.data import TrainingEpochs, ValidationBatches
from trainloop_nb.callbacks.logging import CSVLogger, TensorBoardLogger
from trainloop_nb.loop import TrainingLoop

from toy_runs import quiet_printer, toy_data, toy_loop
from trainloop_nb.callbacks.progress import ProgressPrinter

from host_reads import count_host_reads

TRAIN_BATCHES, VALID_BATCHES = 5, 3  # 160 samples in batches of 32; 70 in batches of 32 (the last one short)


def make_loop(callbacks=(), metrics=("accuracy",), validation=True, lr=0.3, seed=0):
    return toy_loop(callbacks, train=160, valid=70, features=6, classes=4, lr=lr, metrics=metrics,
                    validation=validation, seed=seed)


class FailAt(Callback):
    "Raises RuntimeError at the training batch_end of the given global step."
    def __init__(self, step): self.step = step
    def batch_end(self, loop):
        if loop.phase == "training" and loop.step == self.step: raise RuntimeError("boom")


class RecordLosses(Callback):
    "The independent oracle: each training step's loss and learning rate, read at once."
    def __init__(self): self.losses, self.rates = {}, {}
    def batch_end(self, loop):
        if loop.phase == "training" and loop.last_step_loss is not None:
            self.losses[loop.step] = loop.last_step_loss.item()
            self.rates[loop.step] = loop.learning_rate


# ---------------------------------------------------------------------------------------------- CSVLogger

def read_rows(path):
    with open(path, newline="") as f: return list(csv.reader(f))


def test_csv_rows_header_and_history(tmp_path):
    path = tmp_path / "log.csv"
    loop, model = make_loop([CSVLogger(path)], metrics=["accuracy", "mcc"])
    history = loop.fit(model, epochs=3, device="cpu")
    rows = read_rows(path)
    assert rows[0] == ["epoch", "batch", "phase", "loss", "accuracy", "mcc"]
    body = rows[1:]
    assert len(body) == 3 * (TRAIN_BATCHES + VALID_BATCHES)
    one_epoch = [(b, "training") for b in range(1, TRAIN_BATCHES + 1)] + [(b, "validation") for b in range(1, VALID_BATCHES + 1)]
    assert [(int(r[0]), int(r[1]), r[2]) for r in body] == [(e, b, p) for e in (1, 2, 3) for b, p in one_epoch]
    # the last row of each phase of each epoch is that epoch's history record, exactly (repr round-trips)
    for record in history:
        for phase, prefix in (("training", "train_"), ("validation", "valid_")):
            last = [r for r in body if int(r[0]) == record["epoch"] and r[2] == phase][-1]
            for name, cell in zip(["loss", "accuracy", "mcc"], last[3:]):
                assert float(cell) == record[prefix + name]


def test_csv_numbers_read_back_as_numbers(tmp_path):
    path = tmp_path / "log.csv"
    loop, model = make_loop([CSVLogger(path)])
    loop.fit(model, epochs=2, device="cpu")
    for row in read_rows(path)[1:]:
        assert all(cell == cell.strip() for cell in row)
        assert int(row[0]) >= 1 and int(row[1]) >= 1  # csv gives strings that parse as numbers
        assert all(math.isfinite(float(c)) for c in row[3:])
    frame = pd.read_csv(path)
    assert frame["epoch"].dtype == "int64" and frame["batch"].dtype == "int64"
    assert frame["loss"].dtype == "float64" and frame["accuracy"].dtype == "float64"
    assert set(frame["phase"]) == {"training", "validation"}
    assert frame["loss"].notna().all() and ((frame["accuracy"] >= 0) & (frame["accuracy"] <= 1)).all()


def test_csv_running_values_match_an_independent_mean(tmp_path):
    "Each training row's loss is the sample-weighted mean of the batch losses so far in that epoch."
    path = tmp_path / "log.csv"
    oracle = RecordLosses()
    loop, model = make_loop([CSVLogger(path), oracle], validation=False)
    loop.fit(model, epochs=1, device="cpu")
    frame = pd.read_csv(path)
    losses = [oracle.losses[s] for s in sorted(oracle.losses)]
    running = [sum(losses[:i + 1]) / (i + 1) for i in range(len(losses))]  # equal batch sizes
    assert frame["loss"].tolist() == pytest.approx(running, rel=1e-6)
    assert set(frame["phase"]) == {"training"}


def test_csv_complete_and_closed_after_a_failure(tmp_path):
    path = tmp_path / "log.csv"
    logger = CSVLogger(path)
    loop, model = make_loop([logger, FailAt(step=TRAIN_BATCHES + 2)])  # fails at batch 2 of epoch 2
    with pytest.raises(RuntimeError, match="boom"): loop.fit(model, epochs=3, device="cpu")
    assert logger.file is None
    text = path.read_text()
    assert text.endswith("\n")
    rows = read_rows(path)[1:]
    assert len(rows) == TRAIN_BATCHES + VALID_BATCHES + 2
    assert [(r[0], r[1], r[2]) for r in rows[-2:]] == [("2", "1", "training"), ("2", "2", "training")]


def test_csv_rows_are_flushed_as_written(tmp_path):
    path = tmp_path / "log.csv"
    seen = []
    def reader(loop, event):
        if event == "batch_end": seen.append(len(read_rows(path)))
    loop, model = make_loop([CSVLogger(path), reader], validation=False)
    loop.fit(model, epochs=1, device="cpu")
    assert seen == list(range(2, TRAIN_BATCHES + 2))  # header + one row per batch so far, visible at once


def test_csv_truncates_by_default_and_appends_when_asked(tmp_path):
    path = tmp_path / "log.csv"
    loop, model = make_loop([CSVLogger(path)])
    loop.fit(model, epochs=1, device="cpu")
    loop.fit(model, epochs=1, device="cpu")
    assert len(read_rows(path)) == 1 + TRAIN_BATCHES + VALID_BATCHES
    loop, model = make_loop([CSVLogger(path, append=True)])
    loop.fit(model, epochs=2, device="cpu")
    rows = read_rows(path)
    assert rows.count(rows[0]) == 1  # one header
    assert len(rows) == 1 + 3 * (TRAIN_BATCHES + VALID_BATCHES)


def test_csv_append_writes_a_header_to_a_new_or_empty_file(tmp_path):
    for path in (tmp_path / "new.csv", tmp_path / "empty.csv"):
        if path.name == "empty.csv": path.write_text("")
        loop, model = make_loop([CSVLogger(path, append=True)], validation=False)
        loop.fit(model, epochs=1, device="cpu")
        assert read_rows(path)[0] == ["epoch", "batch", "phase", "loss", "accuracy"]
        assert len(read_rows(path)) == 1 + TRAIN_BATCHES


def test_csv_append_refuses_a_different_header(tmp_path):
    path = tmp_path / "log.csv"
    loop, model = make_loop([CSVLogger(path)], metrics=["accuracy"])
    loop.fit(model, epochs=1, device="cpu")
    before = path.read_text()
    logger = CSVLogger(path, append=True)
    loop, model = make_loop([logger], metrics=["accuracy", "top5_accuracy"])
    with pytest.raises(ValueError, match="already has the columns.*top5_accuracy"): loop.fit(model, device="cpu")
    assert path.read_text() == before and logger.file is None


def test_csv_bad_path_and_nested_folder(tmp_path):
    for bad in ("run/log.txt", "run/log", tmp_path / "log.csv.gz"):
        with pytest.raises(ValueError, match=r"must end in \.csv"): CSVLogger(bad)
    path = tmp_path / "a" / "b" / "c" / "log.csv"
    logger = CSVLogger(path)
    assert not path.parent.exists()  # making the logger touches no disk
    loop, model = make_loop([logger], validation=False)
    loop.fit(model, epochs=1, device="cpu")
    assert path.is_file() and len(read_rows(path)) == 1 + TRAIN_BATCHES


def test_csv_path_that_is_a_folder_or_under_a_file_is_refused_when_made(tmp_path):
    (tmp_path / "log.csv").mkdir()
    with pytest.raises(ValueError, match=f"{tmp_path / 'log.csv'} is a folder.*file path such as"):
        CSVLogger(tmp_path / "log.csv")
    (tmp_path / "run").write_text("a file where a folder should be")
    with pytest.raises(ValueError, match=f"cannot write {tmp_path / 'run' / 'logs' / 'log.csv'}: {tmp_path / 'run'} is a file"):
        CSVLogger(tmp_path / "run" / "logs" / "log.csv")


def open_files():
    "The paths this process holds open (Linux: /proc/self/fd)."
    paths = []
    for fd in os.listdir("/proc/self/fd"):
        try: paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError: pass  # the listing's own descriptor, closed by now
    return paths


@pytest.mark.skipif(not (os.path.exists("/dev/full") and os.path.isdir("/proc/self/fd")), reason="needs /dev/full and /proc")
def test_csv_file_is_closed_after_a_failed_write(tmp_path):
    (tmp_path / "log.csv").symlink_to("/dev/full")  # every write fails as on a full disk (ENOSPC)
    logger = CSVLogger(tmp_path / "log.csv")
    loop, model = make_loop([logger])
    with pytest.raises(OSError) as info: loop.fit(model, epochs=1, device="cpu")
    assert info.value.errno == errno.ENOSPC  # the failure itself goes on to the user
    assert "/dev/full" not in open_files()  # and the log's file handle is closed


def test_csv_columns_of_a_distributed_run_say_they_hold_rank_0s_values(tmp_path):
    class RankZeroOfTwo(TrainingLoop):  # what rank 0 of a two-process run sees, without starting one
        rank = property(lambda self: 0, lambda self, value: None)
        world_size = property(lambda self: 2, lambda self, value: None)

    def run(loop_class, path):
        x, y = toy_data(160, 6, 4)
        torch.manual_seed(0)
        model = torch.nn.Linear(6, 4)
        loop = loop_class(TrainingEpochs((x, y), batch_size=32), optimizer=torch.optim.SGD(model.parameters(), lr=0.3),
                          metrics=["accuracy"], callbacks=[quiet_printer(), CSVLogger(path)])
        loop.fit(model, epochs=1, device="cpu")
        return read_rows(path)
    distributed, single = run(RankZeroOfTwo, tmp_path / "rank0.csv"), run(TrainingLoop, tmp_path / "single.csv")
    assert distributed[0] == ["epoch", "batch", "phase", "rank0_loss", "rank0_accuracy"]
    assert single[0] == ["epoch", "batch", "phase", "loss", "accuracy"] and distributed[1:] == single[1:]
    assert list(pd.read_csv(tmp_path / "rank0.csv").columns) == distributed[0]


def test_csv_skips_batches_cancelled_before_the_loss(tmp_path):
    path = tmp_path / "log.csv"
    class CancelSecond(Callback):
        def batch_start(self, loop):
            if loop.phase == "training" and loop.batch_index == 1: raise CancelBatch()
    loop, model = make_loop([CancelSecond(), CSVLogger(path)], validation=False)
    loop.fit(model, epochs=1, device="cpu")
    assert [int(r[1]) for r in read_rows(path)[1:]] == [1, 3, 4, 5]


# ---------------------------------------------------------------------------------------- TensorBoardLogger

def scalars(folder, tag):
    acc = EventAccumulator(str(folder)).Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def test_tensorboard_epoch_values_and_batch_counts(tmp_path):
    logger, oracle = TensorBoardLogger(tmp_path / "tb"), RecordLosses()
    loop, model = make_loop([logger, oracle], metrics=["accuracy", "top5_accuracy"])
    history = loop.fit(model, epochs=3, device="cpu")
    assert logger.run_dir.parent == tmp_path / "tb"
    assert sorted(p.name for p in logger.run_dir.iterdir()) == ["train", "validation"]
    train, valid = logger.run_dir / "train", logger.run_dir / "validation"
    for folder, prefix in ((train, "train_"), (valid, "valid_")):
        for name in ("loss", "accuracy", "top5_accuracy"):
            logged = scalars(folder, f"epoch_{name}")
            assert [s for s, _ in logged] == [1, 2, 3]
            for (_, value), record in zip(logged, history):
                assert value == pytest.approx(record[prefix + name], rel=1e-6)  # stored as float32
    batch = scalars(train, "batch_loss")
    assert len(batch) == loop.step == 3 * TRAIN_BATCHES
    assert [s for s, _ in batch] == list(range(1, loop.step + 1))
    assert [v for _, v in batch] == pytest.approx([oracle.losses[s] for s, _ in batch], rel=1e-6)
    assert [s for s, _ in scalars(train, "learning_rate")] == list(range(1, loop.step + 1))
    assert scalars(valid, "batch_loss") == [] and scalars(valid, "learning_rate") == []
    assert logger.writers == {}


def test_tensorboard_learning_rate_follows_the_optimizer(tmp_path):
    logger, oracle = TensorBoardLogger(tmp_path / "tb"), RecordLosses()
    def decay(loop, event):
        if event == "batch_start" and loop.phase == "training":
            loop.optimizer.param_groups[0]["lr"] = 0.5 / (1 + loop.step)
    loop, model = make_loop([decay, logger, oracle], validation=False)
    loop.fit(model, epochs=2, device="cpu")
    logged = scalars(logger.run_dir / "train", "learning_rate")
    assert [v for _, v in logged] == pytest.approx([0.5 / s for s, _ in logged], rel=1e-6)
    assert [v for _, v in logged] == pytest.approx([oracle.rates[s] for s, _ in logged], rel=1e-6)


def test_tensorboard_two_fits_in_the_same_second_get_distinct_folders(tmp_path, monkeypatch):
    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None): return cls(2026, 3, 14, 10, 15, 0)
    monkeypatch.setattr(tl_logging, "datetime", Frozen)
    logger = TensorBoardLogger(tmp_path / "tb")
    loop, model = make_loop([logger], validation=False)
    names = []
    for _ in range(3):
        loop.fit(model, epochs=1, device="cpu")
        names.append(logger.run_dir.name)
    assert names == ["20260314-101500", "20260314-101500-1", "20260314-101500-2"]
    for name in names: assert len(scalars(tmp_path / "tb" / name / "train", "batch_loss")) == TRAIN_BATCHES


def test_tensorboard_two_real_fits_back_to_back(tmp_path):
    logger = TensorBoardLogger(tmp_path / "tb")
    loop, model = make_loop([logger], validation=False)
    dirs = []
    for _ in range(2):
        loop.fit(model, epochs=1, device="cpu")
        dirs.append(logger.run_dir)
    assert dirs[0] != dirs[1] and all(d.is_dir() for d in dirs)


def test_tensorboard_buffers_until_a_flush(tmp_path):
    "With a long flush period nothing is written per step: the per-step losses wait on the device until training_end."
    seen = []
    logger = TensorBoardLogger(tmp_path / "tb", flush_secs=3600)
    def peek(loop, event):
        if event == "batch_end" and loop.phase == "training":
            seen.append(len(scalars(logger.run_dir / "train", "batch_loss")))
    loop, model = make_loop([logger, peek], validation=False)
    loop.fit(model, epochs=2, device="cpu")
    assert seen == [0] * TRAIN_BATCHES + [TRAIN_BATCHES] * TRAIN_BATCHES


def test_tensorboard_flushes_as_it_goes_with_a_short_period(tmp_path):
    seen = []
    logger = TensorBoardLogger(tmp_path / "tb", flush_secs=1e-9)
    def peek(loop, event):
        if event == "batch_end" and loop.phase == "training":
            seen.append(len(scalars(logger.run_dir / "train", "batch_loss")))
    loop, model = make_loop([logger, peek], validation=False)
    loop.fit(model, epochs=1, device="cpu")
    assert seen == list(range(1, TRAIN_BATCHES + 1))


def test_tensorboard_closed_and_complete_after_a_failure(tmp_path):
    logger = TensorBoardLogger(tmp_path / "tb", flush_secs=3600)
    loop, model = make_loop([logger, FailAt(step=TRAIN_BATCHES + 3)])
    with pytest.raises(RuntimeError, match="boom"): loop.fit(model, epochs=3, device="cpu")
    assert logger.writers == {}
    train = logger.run_dir / "train"
    assert [s for s, _ in scalars(train, "batch_loss")] == list(range(1, TRAIN_BATCHES + 4))
    assert [s for s, _ in scalars(train, "epoch_loss")] == [1]
    assert [s for s, _ in scalars(logger.run_dir / "validation", "epoch_loss")] == [1]


def test_tensorboard_skips_steps_that_were_not_taken(tmp_path):
    class CancelUpdate(Callback):
        def update_start(self, loop):
            if loop.batch_index == 2: raise CancelBatch()
    logger = TensorBoardLogger(tmp_path / "tb")
    loop, model = make_loop([CancelUpdate(), logger], validation=False)
    loop.fit(model, epochs=2, device="cpu")
    assert loop.step == 2 * (TRAIN_BATCHES - 1)
    assert [s for s, _ in scalars(logger.run_dir / "train", "batch_loss")] == list(range(1, loop.step + 1))


def test_tensorboard_batch_metrics_are_each_batch_own_values(tmp_path):
    values = {}
    def own_accuracy(loop, event):
        if event == "batch_end" and loop.phase == "training":
            values[loop.step] = (loop.last_step_output.argmax(1) == loop.last_step_target).float().mean().item()
    logger = TensorBoardLogger(tmp_path / "tb")  # per-step metrics are on by default
    loop, model = make_loop([logger, own_accuracy], validation=False)
    loop.fit(model, epochs=2, device="cpu")
    logged = scalars(logger.run_dir / "train", "batch_accuracy")
    assert [s for s, _ in logged] == list(range(1, loop.step + 1))
    assert [v for _, v in logged] == pytest.approx([values[s] for s, _ in logged])
    assert scalars(logger.run_dir / "train", "batch_loss") != []
    plain = TensorBoardLogger(tmp_path / "plain", batch_metrics=False)
    plain_loop, plain_model = make_loop([plain], validation=False)
    plain_loop.fit(plain_model, device="cpu")
    assert scalars(plain.run_dir / "train", "batch_accuracy") == []


def test_tensorboard_log_dir_that_is_a_file_is_refused_when_made(tmp_path):
    (tmp_path / "stats").write_text("a file where a folder should be")
    with pytest.raises(ValueError, match=f"cannot write {tmp_path / 'stats'}: {tmp_path / 'stats'} is a file, not a folder"):
        TensorBoardLogger(tmp_path / "stats")
    with pytest.raises(ValueError, match=f"{tmp_path / 'stats'} is a file"): TensorBoardLogger(tmp_path / "stats" / "more")


def test_tensorboard_arguments_and_missing_package(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="flush_secs"): TensorBoardLogger(tmp_path, flush_secs=0)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(ImportError, match="pip install tensorboard"): TensorBoardLogger(tmp_path)


def test_tensorboard_per_step_metrics_match_sklearn_and_cost_no_per_step_sync(tmp_path):
    from sklearn.metrics import matthews_corrcoef
    per_step = {}
    def own(loop, event):
        if event == "batch_end" and loop.phase == "training":
            out, tgt = loop.last_step_output.argmax(1), loop.last_step_target
            per_step[loop.step] = matthews_corrcoef(tgt.numpy(), out.numpy())
    logger = TensorBoardLogger(tmp_path / "tb", flush_secs=3600)
    loop, model = make_loop([logger, own], metrics=("accuracy", "mcc"), validation=False)
    loop.fit(model, epochs=2, device="cpu")
    logged = scalars(logger.run_dir / "train", "batch_mcc")
    assert [s for s, _ in logged] == sorted(per_step)
    assert [v for _, v in logged] == pytest.approx([per_step[s] for s, _ in logged], abs=1e-6)

    def syncs(epochs):
        lg = TensorBoardLogger(tmp_path / f"sync{epochs}", flush_secs=3600)
        lp, md = make_loop([lg], metrics=("accuracy", "mcc"), validation=False)
        with count_host_reads() as count:
            lp.fit(md, epochs=epochs, device="cpu")
        return count[0], lp.step
    (one, steps1), (three, steps3) = syncs(1), syncs(3)
    # reads happen per phase and per flush, never per step: 3 epochs cost 3 times 1 epoch's reads
    assert steps3 == 3 * steps1 and three == 3 * one and one < steps1


class ReadEveryBatch(Callback):
    "Reads the running loss at every training batch."
    def __init__(self): self.values = []
    def batch_end(self, loop):
        if loop.phase == "training": self.values.append(loop.last_stats["loss"])


def test_csv_rows_and_other_readers_every_batch_get_the_running_values(tmp_path):
    "A CSV row a batch, and any callback that reads the sums every batch, get the running mean; history is unchanged."
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 6, generator=g)
    y = (x[:, 0] > 0).long()
    def fit(callbacks):
        torch.manual_seed(0)
        model = torch.nn.Linear(6, 2)
        oracle, reader = RecordLosses(), ReadEveryBatch()
        loop = TrainingLoop(TrainingEpochs((x, y), batch_size=2, seed=0), None, torch.optim.SGD(model.parameters(), lr=0.1),
                            callbacks=[*callbacks, oracle, reader], include_default_callbacks=False)
        loop.fit(model, epochs=1, device="cpu")
        losses = [oracle.losses[s] for s in sorted(oracle.losses)]
        assert len(losses) == 150
        assert reader.values == pytest.approx([sum(losses[:i + 1]) / (i + 1) for i in range(150)], rel=1e-12)
        return loop, reader.values
    grouped, grouped_values = fit([])
    each, each_values = fit([CSVLogger(tmp_path / "log.csv")])
    assert pd.read_csv(tmp_path / "log.csv")["loss"].tolist() == pytest.approx(each_values, rel=1e-12)
    assert grouped.history[0]["train_loss"] == each.history[0]["train_loss"]
