"""compare_runs reads the same runs from CSV logs, TensorBoard run folders and an MLflow database, and they agree;
resumed runs have each epoch once; clear errors for a path without runs and an unknown metric; the picker redraws."""
from __future__ import annotations

import contextlib
import shutil
import sqlite3

import pytest
import torch

pytest.importorskip("mlflow")

from trainloop_nb.callbacks.checkpoint import Checkpoint, checkpoint_name
from trainloop_nb.callbacks.logging import CSVLogger, TensorBoardLogger
from trainloop_nb.callbacks.tracking import MLflowLogger
from trainloop_nb.compare import RunPicker, compare_runs
from trainloop_nb.core import Callback

from toy_runs import toy_loop

EPOCHS, STEPS = 3, 6
RATES = (0.03, 0.1, 0.3)
METRICS = ["train_loss", "valid_loss", "valid_accuracy"]


def loggers(folder, name):
    return [CSVLogger(folder / name / "log.csv"), TensorBoardLogger(folder / name / "tensorboard"),
            MLflowLogger(folder / "mlflow.db", experiment="compare", run_name=name)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    "Three toy fits, each logged by all three loggers; their histories by run name."
    folder = tmp_path_factory.mktemp("runs")
    histories = {}
    for lr in RATES:
        loop, model = toy_loop(loggers(folder, f"lr={lr}"), train=192, valid=64, features=4, lr=lr)
        histories[f"lr={lr}"] = loop.fit(model, epochs=EPOCHS, device="cpu")
    return folder, histories


def lines(figure):
    "{(metric, run label): (xs, ys)} as drawn."
    return {(ax.get_title(), line.get_label()): (list(line.get_xdata()), list(line.get_ydata()))
            for ax in figure.axes for line in ax.get_lines()}


def tensorboard_folders(folder):
    return {name: next((folder / name / "tensorboard").iterdir()) for name in (f"lr={lr}" for lr in RATES)}


def test_csv_tensorboard_and_mlflow_show_the_same_runs(runs):
    folder, histories = runs
    from_csv = lines(compare_runs([folder / name / "log.csv" for name in histories], METRICS))
    from_mlflow = lines(compare_runs(folder / "mlflow.db", METRICS))
    stamps = tensorboard_folders(folder)
    from_tensorboard = {(metric, name): lines(compare_runs(stamps[name], METRICS))[(metric, stamps[name].name)]
                        for metric in METRICS for name in histories}
    every = {(m, n) for m in METRICS for n in histories}
    assert from_csv.keys() == from_mlflow.keys() == from_tensorboard.keys() == every
    for (metric, name), (xs, ys) in from_mlflow.items():
        expected = [r[metric] for r in histories[name]]
        assert xs == [1, 2, 3] and ys == expected  # MLflow keeps doubles
        assert from_csv[(metric, name)] == (xs, expected)  # CSV writes repr(float): read back exactly
        assert from_tensorboard[(metric, name)][0] == xs
        assert from_tensorboard[(metric, name)][1] == pytest.approx(expected, rel=1e-6)  # TensorBoard keeps float32


def test_a_folder_holding_runs_gives_every_run_of_every_kind(runs):
    folder, histories = runs
    figure = compare_runs(folder, "valid_loss")
    labels = [line.get_label() for line in figure.axes[0].get_lines()]
    assert len(labels) == 9 and len(set(labels)) == 9  # 3 CSV, 3 TensorBoard, 3 MLflow; alike names told apart
    assert sum(label.startswith("lr=0.1 (") for label in labels) == 2  # the CSV folder and the MLflow run


def test_per_step_values_from_mlflow_and_tensorboard(runs):
    folder, histories = runs
    from_mlflow = lines(compare_runs(folder / "mlflow.db", ["batch_loss", "learning_rate"], x="step"))
    stamps = tensorboard_folders(folder)
    for name in histories:
        xs, ys = from_mlflow[("batch_loss", name)]
        assert xs == list(range(1, EPOCHS * STEPS + 1))
        assert from_mlflow[("learning_rate", name)][1] == [float(name[3:])] * len(xs)
        tb_xs, tb_ys = lines(compare_runs(stamps[name], "batch_loss", x="step"))[("batch_loss", stamps[name].name)]
        assert tb_xs == xs and tb_ys == pytest.approx(ys, rel=1e-6)


class StopAt(Callback):
    def batch_end(self, loop):
        if loop.phase == "training" and loop.step == STEPS + 4: raise KeyboardInterrupt


def test_a_resumed_run_has_each_epoch_once_in_every_source(tmp_path):
    def fit(callbacks, **kwargs):
        loop, model = toy_loop([*loggers(tmp_path, "resumed"), *callbacks], train=192, valid=64, features=4)
        return loop.fit(model, epochs=EPOCHS, device="cpu", **kwargs)
    with pytest.raises(KeyboardInterrupt):
        fit([Checkpoint(tmp_path / "ck", every_steps=4, every_epochs=None, keep_last=None), StopAt()])
    # back to step 4, in epoch 1: epoch 1 and steps 5..10 were written by the stopped fit and come again
    history = fit([Checkpoint(tmp_path / "after", every_steps=4, every_epochs=None)],
                  resume_from=tmp_path / "ck" / checkpoint_name(4))
    stamp = next((tmp_path / "resumed" / "tensorboard").iterdir())
    for source, label in ((tmp_path / "resumed" / "log.csv", "resumed"), (stamp, stamp.name),
                          (tmp_path / "mlflow.db", "resumed")):
        xs, ys = lines(compare_runs(source, "valid_loss"))[("valid_loss", label)]
        assert xs == [1, 2, 3], source
        assert ys == pytest.approx([r["valid_loss"] for r in history], rel=1e-6), source


def test_a_path_without_runs_and_an_unknown_metric_are_explained(runs, tmp_path):
    folder, _ = runs
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("no run here")
    for where in (tmp_path / "empty", tmp_path / "notes.txt"):
        with pytest.raises(ValueError, match="holds no run: give a CSVLogger log"): compare_runs(where)
    with pytest.raises(FileNotFoundError, match="does not exist"): compare_runs(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no MLflow database"): compare_runs(tmp_path / "missing.db")
    other = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(other)) as db: db.execute("CREATE TABLE notes (text)")
    before = other.read_bytes()
    with pytest.raises(ValueError, match="is not an MLflow database"): compare_runs(other)
    (tmp_path / "empty" / "table.csv").write_text("a,b\n1,2\n")  # neither is a run: a folder of them holds none
    shutil.copy(other, tmp_path / "empty" / "other.db")
    with pytest.raises(ValueError, match="holds no run"): compare_runs(tmp_path / "empty")
    assert other.read_bytes() == before  # MLflow was never let at it
    with pytest.raises(ValueError, match="'valid_los'.*train_accuracy, train_loss, valid_accuracy, valid_loss$"):
        compare_runs(folder / "mlflow.db", "valid_los")
    with pytest.raises(ValueError, match="none of these runs has per-step values"):
        compare_runs(folder / "lr=0.1" / "log.csv", "batch_loss", x="step")
    with pytest.raises(ValueError, match="x must be 'epoch'"): compare_runs(folder, x="time")


def test_the_picker_redraws_the_chosen_runs_and_metrics(runs):
    pytest.importorskip("ipywidgets")
    folder, histories = runs
    figure = compare_runs(folder / "mlflow.db", "valid_loss")
    picker = RunPicker(figure)
    first = picker.image.value
    picker.metrics.value = ("valid_loss", "train_loss")
    picker.runs.value = ("lr=0.03",)
    assert [ax.get_title() for ax in figure.axes] == ["valid_loss", "train_loss"]
    assert set(lines(figure)) == {("valid_loss", "lr=0.03"), ("train_loss", "lr=0.03")}
    assert picker.image.value != first and bytes(picker.image.value).startswith(b"\x89PNG")
    picker.metrics.value = ()
    assert "choose at least one metric" in picker.message.value and len(figure.axes) == 2  # the last figure stays


def test_outside_a_kernel_the_figure_shows_as_an_image(runs):
    folder, _ = runs
    bundle = compare_runs(folder / "mlflow.db", "valid_loss")._repr_mimebundle_()
    assert set(bundle) == {"image/png", "text/plain"}
    assert bundle["text/plain"] == "RunsFigure(3 of 3 runs; valid_loss per epoch)"
