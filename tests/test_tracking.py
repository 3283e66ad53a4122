"""MLflowLogger on a real SQLite database, every value read back with MLflow's own client: parameters, history,
per-step values, flushing on its clock, exactly once across a resume, and the errors at fit_start."""
from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("mlflow")
from mlflow import MlflowClient

from trainloop_nb.callbacks.checkpoint import Checkpoint, checkpoint_name
from trainloop_nb.callbacks.logging import CSVLogger
from trainloop_nb.callbacks.tracking import MLflowLogger
from trainloop_nb.core import Callback, Order

from toy_runs import toy_loop

TRAIN, VALID, BATCH = 192, 64, 32  # 6 training steps per epoch
STEPS = TRAIN // BATCH


@pytest.fixture(scope="module")
def database(tmp_path_factory):
    "One SQLite database for the module (making its tables takes seconds); each test logs to its own experiment."
    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()  # creates the tables
    return path


def make_loop(callbacks, lr=0.1, seed=0):
    return toy_loop(callbacks, train=TRAIN, valid=VALID, features=4, batch_size=BATCH, lr=lr, seed=seed)


def points(client, run_id, key):
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


class LossesPerStep(Callback):
    "The oracle for per-step values: each step's own loss and learning rate, read on the host."
    def __init__(self): self.seen = {}
    def batch_end(self, loop):
        if loop.phase == "training" and loop.last_step_loss is not None:
            self.seen[loop.step] = (loop.last_step_loss.item(), loop.learning_rate)


def test_params_history_and_per_step_values_read_back(database):
    logger, oracle = MLflowLogger(database, experiment="read_back", run_name="first"), LossesPerStep()
    loop, model = make_loop([logger, oracle])
    history = loop.fit(model, epochs=2, device="cpu")
    client = MlflowClient(f"sqlite:///{database}")
    run = client.get_run(logger.run_id)
    assert run.info.run_name == "first" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "read_back"
    params = run.data.params
    options = (params["epochs"], params["precision"], params["accumulate_steps"], params["compile"])
    assert options == ("2", "32", "1", "False")
    assert (params["optimizer"], float(params["lr"]), float(params["momentum"])) == ("SGD", 0.1, 0.0)
    for key in ("train_loss", "train_accuracy", "valid_loss", "valid_accuracy"):
        assert points(client, logger.run_id, key) == [(r["epoch"], r[key]) for r in history]  # step = epoch number
    assert "time" not in run.data.metrics and "epoch" not in run.data.metrics
    losses = points(client, logger.run_id, "batch_loss")
    assert [s for s, _ in losses] == list(range(1, 2 * STEPS + 1))
    assert losses == [(s, oracle.seen[s][0]) for s in range(1, 2 * STEPS + 1)]  # float32 read as a double both ways
    assert points(client, logger.run_id, "learning_rate") == [(s, 0.1) for s in range(1, 2 * STEPS + 1)]
    accuracies = points(client, logger.run_id, "batch_accuracy")
    assert len(accuracies) == 2 * STEPS and all(v in {i / BATCH for i in range(BATCH + 1)} for _, v in accuracies)


def test_batch_metrics_false_keeps_loss_and_learning_rate_only(database):
    logger = MLflowLogger(database, experiment="no_batch_metrics", batch_metrics=False)
    loop, model = make_loop([logger])
    loop.fit(model, epochs=1, device="cpu")
    metrics = set(MlflowClient(f"sqlite:///{database}").get_run(logger.run_id).data.metrics)
    assert metrics == {"batch_loss", "learning_rate", "train_loss", "train_accuracy", "valid_loss", "valid_accuracy"}


class SetClock(Callback):
    "Step 3: moves the fake clock past the flush time (if `advance`), before the logger runs. Step 4: reads MLflow."
    order = Order.default - 1
    def __init__(self, clock, advance, database):
        self.clock, self.advance, self.database, self.seen = clock, advance, database, None
    def batch_end(self, loop):
        if loop.phase != "training": return
        if loop.step == 3 and self.advance: self.clock[0] = 100.0
        if loop.step == 4:
            logger = next(cb for cb in loop.callbacks if isinstance(cb, MLflowLogger))
            logger.wait()  # the writes flushed so far are done; nothing is flushed by it
            self.seen = [s for s, _ in points(MlflowClient(f"sqlite:///{self.database}"), logger.run_id, "batch_loss")]


@pytest.mark.parametrize("advance", [True, False])
def test_per_step_values_are_written_when_the_clock_says(database, advance):
    clock = [0.0]
    watcher = SetClock(clock, advance, database)
    logger = MLflowLogger(database, experiment=f"clock_{advance}", flush_secs=50, clock=lambda: clock[0])
    loop, model = make_loop([logger, watcher])
    loop.fit(model, epochs=1, device="cpu")
    assert watcher.seen == ([1, 2, 3] if advance else [])  # nothing flushed before its time, all of it at its time


class StopAt(Callback):
    def __init__(self, step): self.step = step
    def batch_end(self, loop):
        if loop.phase == "training" and loop.step == self.step: raise KeyboardInterrupt


def test_a_resumed_fit_continues_the_run_and_writes_each_step_once(database, tmp_path):
    client = MlflowClient(f"sqlite:///{database}")
    reference = MLflowLogger(database, experiment="uninterrupted")
    loop, model = make_loop([reference])
    reference_history = loop.fit(model, epochs=3, device="cpu")

    logger = MLflowLogger(database, experiment="resumed")
    loop, model = make_loop([logger, Checkpoint(tmp_path / "ck", every_steps=4, every_epochs=None, keep_last=None),
                             StopAt(step=STEPS + 4)])  # stops in epoch 2: steps 5..10 and epoch 1 are past step 4
    with pytest.raises(KeyboardInterrupt): loop.fit(model, epochs=3, device="cpu")
    stopped_run = logger.run_id
    assert client.get_run(stopped_run).info.status == "KILLED"
    assert max(s for s, _ in points(client, stopped_run, "batch_loss")) == STEPS + 4

    resumed = MLflowLogger(database, experiment="resumed")  # fresh objects, as after a restart
    loop, model = make_loop([resumed, Checkpoint(tmp_path / "after", every_steps=4, every_epochs=None, keep_last=None)])
    history = loop.fit(model, epochs=3, device="cpu", resume_from=tmp_path / "ck" / checkpoint_name(4))
    assert resumed.run_id == stopped_run and client.get_run(stopped_run).info.status == "FINISHED"
    assert len(client.search_runs([client.get_experiment_by_name("resumed").experiment_id])) == 1
    run = client.get_run(stopped_run)
    for key in run.data.metrics:
        steps = [s for s, _ in points(client, stopped_run, key)]
        assert steps == sorted(set(steps)), f"{key}: a step written twice: {steps}"
        assert points(client, stopped_run, key) == points(client, reference.run_id, key)
    for key in ("train_loss", "valid_loss", "valid_accuracy"):
        assert points(client, stopped_run, key) == [(r["epoch"], r[key]) for r in history]
    assert [{k: v for k, v in r.items() if k != "time"} for r in history] == \
        [{k: v for k, v in r.items() if k != "time"} for r in reference_history]
    assert [s for s, _ in points(client, stopped_run, "batch_loss")] == list(range(1, 3 * STEPS + 1))


def test_the_state_names_the_run_and_its_last_step(database):
    logger = MLflowLogger(database, experiment="state")
    loop, model = make_loop([logger])
    loop.fit(model, epochs=1, device="cpu")
    assert logger.state_dict() == {"run_id": logger.run_id, "step": STEPS}
    with pytest.raises(ValueError, match="run_id"): logger.load_state_dict({"step": 3})


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def bad_input_fit(tmp_path, logger):
    "A fit that must fail at fit_start: nothing trained, and the CSV log of the same fit complete and closed."
    csv = CSVLogger(tmp_path / "log.csv")
    loop, model = make_loop([csv, logger])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(Exception) as failed: loop.fit(model, epochs=2, device="cpu")
    assert loop.step == 0 and loop.history == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert csv.file is None and (tmp_path / "log.csv").read_text() == "epoch,batch,phase,loss,accuracy\n"
    return failed.value


def test_an_unreachable_server_is_named_at_fit_start(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    uri = f"http://127.0.0.1:{closed_port()}"
    error = bad_input_fit(tmp_path, MLflowLogger(uri))
    assert isinstance(error, ConnectionError) and uri in str(error) and "sqlite:///" in str(error)


def test_a_deleted_experiment_is_named_at_fit_start(database, tmp_path):
    client = MlflowClient(f"sqlite:///{database}")
    experiment = client.create_experiment("deleted_one")
    client.delete_experiment(experiment)
    error = bad_input_fit(tmp_path, MLflowLogger(database, experiment="deleted_one"))
    assert isinstance(error, ValueError) and "'deleted_one'" in str(error) and "is deleted" in str(error)
    assert f"restore --experiment-id {experiment}" in str(error)
    assert client.search_runs([experiment], run_view_type=3) == []  # no run was made in it


def test_a_read_only_database_is_named_at_fit_start(database, tmp_path):
    read_only = tmp_path / "read_only.db"
    shutil.copy(database, read_only)
    read_only.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    before = read_only.read_bytes()
    error = bad_input_fit(tmp_path, MLflowLogger(read_only))
    assert isinstance(error, PermissionError) and str(read_only) in str(error) and "read-only" in str(error)
    assert read_only.read_bytes() == before


def test_other_ranks_write_nothing(tmp_path):
    switched_off = []
    stub = SimpleNamespace(rank=1, set_enabled=lambda cb, enabled: switched_off.append((cb, enabled)))
    logger = MLflowLogger(tmp_path / "never.db")
    logger.fit_start(stub)
    assert switched_off == [(logger, False)] and not (tmp_path / "never.db").exists() and logger.run_id is None


def test_without_mlflow_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"pip install trainloop_nb\[mlflow\]"): MLflowLogger()


def test_importing_the_package_does_not_import_mlflow():
    probe = "import sys, trainloop_nb; trainloop_nb.__all__; print('mlflow' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "False"


class DeleteRunAt(Callback):
    "Deletes the logger's MLflow run at one step, so that its later writes fail."
    def __init__(self, database, step): self.database, self.step = database, step
    def batch_end(self, loop):
        if loop.phase == "training" and loop.step == self.step:
            logger = next(cb for cb in loop.callbacks if isinstance(cb, MLflowLogger))
            MlflowClient(f"sqlite:///{self.database}").delete_run(logger.run_id)


def test_a_write_that_fails_in_the_writer_thread_stops_the_fit(database):
    logger = MLflowLogger(database, experiment="failing_write")
    loop, model = make_loop([DeleteRunAt(database, step=2), logger])
    with pytest.raises(Exception, match="active") as failed: loop.fit(model, epochs=2, device="cpu")
    assert "MLflowLogger" in "\n".join(getattr(failed.value, "__notes__", []))  # named, not lost in the thread
