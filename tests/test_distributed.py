"""The same script under `torchrun --nproc_per_node=2` (gloo, CPU): what one process with the doubled batch does.

Launches (each costs seconds of process start-up): tests/distributed_fit.py for one fit with gradient accumulation,
the same with compile=True, and one with a failing rank; tests/distributed_runs.py three times for lr_find and
repeated fits in one process group, and ranks whose data disagree, once for a resume inside a phase, and once as two
"nodes" (two torchrun invocations) without a shared disk. Every launch runs under a timeout that kills its whole
process group, workers included.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import torch.distributed as dist

import distributed_fit as script
from toy_runs import cxx_compiler
from trainloop_nb.data import TrainingEpochs, ValidationBatches
from trainloop_nb.loop import TrainingLoop

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="this PyTorch has no torch.distributed with gloo")
HERE = Path(__file__).parent
WORLD = 2


class Finished(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def launch(commands: list[list[str]], cwds: list[Path], timeout: float) -> list[Finished]:
    """Run the commands at once and wait for all. On timeout every process they started is killed (torchrun in a
    session of its own, and its workers, which torchrun starts in sessions of their own), and the test fails with the
    output so far."""
    marker = f"{os.getpid()}-{time.monotonic_ns()}"  # in every worker's environment: found even once torchrun is gone
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)]),
           LAUNCH_MARKER: marker}
    with tempfile.TemporaryDirectory() as logs:
        started = []
        for i, (command, cwd) in enumerate(zip(commands, cwds)):
            out, err = open(f"{logs}/{i}.out", "w+"), open(f"{logs}/{i}.err", "w+")
            started.append((subprocess.Popen(command, stdout=out, stderr=err, text=True, env=env, cwd=cwd,
                                             start_new_session=True), out, err))
        deadline, expired = time.monotonic() + timeout, False
        try:
            for process, _, _ in started:
                try: process.wait(timeout=max(deadline - time.monotonic(), 0))
                except subprocess.TimeoutExpired:
                    expired = True
                    break
        finally:  # also after a normal end: nothing of a launch outlives it
            for process, _, _ in started:
                try: os.killpg(process.pid, signal.SIGKILL)  # torchrun and what stayed in its group
                except ProcessLookupError: pass
            for pid in processes_marked(marker):  # the workers, in sessions of their own, and anything they started
                try: os.kill(pid, signal.SIGKILL)
                except ProcessLookupError: pass
            for process, _, _ in started: process.wait()
        finished = []
        for process, out, err in started:
            out.seek(0), err.seek(0)
            finished.append(Finished(process.returncode, out.read(), err.read()))
            out.close(), err.close()
    if expired:
        pytest.fail(f"timed out after {timeout} s; every process of the launch was killed. Output so far:\n" +
                    "\n".join(f"--- launch {i}:\n{f.stdout}\n{f.stderr}" for i, f in enumerate(finished)))
    return finished


LAUNCH_MARKER = "TRAINLOOP_NB_TEST_LAUNCH"


def processes_marked(marker: str) -> list[int]:
    "The processes whose environment holds LAUNCH_MARKER=marker (Linux's /proc; elsewhere none are found)."
    found, wanted = [], f"{LAUNCH_MARKER}={marker}".encode()
    for entry in Path("/proc").glob("[0-9]*"):
        try: environment = (entry / "environ").read_bytes()
        except OSError: continue  # gone meanwhile, or another user's
        if wanted in environment.split(b"\0"): found.append(int(entry.name))
    return found


def torchrun(out: Path, *args: str, timeout: float = 300, script: str = "distributed_fit.py") -> Finished:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
               str(HERE / script), *args, str(out)]
    return launch([command], [HERE], timeout)[0]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_ranks")
    run = torchrun(out)
    assert run.returncode == 0, run.stdout + run.stderr
    return out, run


def single_process_fit():
    "One process, the batch of both ranks and both accumulated batches in one: 2 ranks x 2 x 4 = 16 samples."
    x, y = script.data()
    net = script.model()
    loop = TrainingLoop(TrainingEpochs((x[:script.TRAIN], y[:script.TRAIN]), script.BATCH * WORLD * script.ACCUMULATE,
                                       seed=3, drop_last=False),  # 72 samples: 4 steps of 16, then one of 8
                        ValidationBatches((x[script.TRAIN:], y[script.TRAIN:]), script.VALID_BATCH),
                        torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9), metrics=["accuracy", "mcc"],
                        include_default_callbacks=False)
    loop.fit(net, script.EPOCHS, device="cpu")
    return net, loop


def test_final_weights_and_history_match_one_process_with_the_doubled_batch(two_ranks):
    out, _ = two_ranks
    result = torch.load(out / "result.pt")
    net, loop = single_process_fit()
    for name, value in net.state_dict().items():
        torch.testing.assert_close(result["state"][name], value, rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(result["history"], loop.history):
        for key in theirs:
            if key != "time": assert ours[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), key
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert [(r["rank"], r["world_size"]) for r in ranks] == [(0, 2), (1, 2)]
    assert all(r["step"] == loop.step == 10 for r in ranks)  # 9 batches per rank and epoch: groups of 2, 2, 2, 2, 1
    # gradients were averaged over ranks once per step (DDP no_sync on the other batch of each group)
    assert all(r["syncs"] == r["step"] for r in ranks)
    assert all(r["group_alive"] and r["group_left"] for r in ranks)  # kept after fit, until leave_process_group()
    without_time = [[{k: v for k, v in h.items() if k != "time"} for h in r["history"]] for r in ranks]
    assert without_time[0] == without_time[1]  # summed over ranks: every rank has the same numbers


def test_validation_metrics_are_exact_sums_over_ranks(two_ranks):
    out, _ = two_ranks
    result = torch.load(out / "result.pt")
    net = script.model()
    net.load_state_dict(result["state"])
    x, y = script.data()
    total, correct, count = torch.zeros((), dtype=torch.float64), 0, 0
    with torch.no_grad():
        for xb, yb in ValidationBatches((x[script.TRAIN:], y[script.TRAIN:]), script.VALID_BATCH):
            output = net(xb)
            total += torch.nn.functional.cross_entropy(output, yb).double() * len(yb)
            correct += int((output.argmax(1) == yb).sum())
            count += len(yb)
    last = result["history"][-1]
    assert last["valid_accuracy"] == correct / count
    assert last["valid_loss"] == total.item() / count


def test_one_progress_table_and_one_csv(two_ranks):
    out, run = two_ranks
    lines = run.stdout.splitlines()
    assert sum(line.startswith("epoch ") for line in lines) == 1, run.stdout
    assert [line.split()[0] for line in lines if line[:1].isdigit()] == ["1", "2"]
    rows = (out / "log.csv").read_text().splitlines()
    assert rows[0] == "epoch,batch,phase,rank0_loss,rank0_accuracy,rank0_mcc" and rows.count(rows[0]) == 1
    # rank 0's rows only: 9 training batches and 3 of the 5 validation batches (rank 1 has the other 2) per epoch
    assert len(rows) == 1 + script.EPOCHS * (9 + 3)
    assert sorted(p.name for p in out.iterdir()) == ["log.csv", "rank0.json", "rank1.json", "result.pt"]


def test_an_error_in_one_rank_ends_every_rank_and_is_shown(tmp_path):
    run = torchrun(tmp_path, "--fail-on-rank", "1", timeout=240)
    assert run.returncode != 0
    assert "rank 1 fails on purpose" in run.stdout + run.stderr
    assert not (tmp_path / "result.pt").exists()


def test_compile_under_torchrun_trains_as_without_it(two_ranks, tmp_path):
    "fit(compile=True) in two processes: DDP wraps the compiled model; the same steps, gradient syncs and weights."
    if cxx_compiler() is None:
        print("skipping: torch.compile's CPU backend needs a C++ compiler and none is installed")
        pytest.skip("no C++ compiler for torch.compile on the CPU")
    run = torchrun(tmp_path, "--compile", timeout=480)
    assert run.returncode == 0, run.stdout + run.stderr
    plain_out, _ = two_ranks
    plain, compiled = torch.load(plain_out / "result.pt"), torch.load(tmp_path / "result.pt")
    for name, weight in plain["state"].items():
        torch.testing.assert_close(compiled["state"][name], weight, rtol=1e-5, atol=1e-6)
    for rank in range(WORLD):
        seen, expected = (json.loads((out / f"rank{rank}.json").read_text()) for out in (tmp_path, plain_out))
        assert (seen["step"], seen["syncs"]) == (expected["step"], expected["syncs"]) == (10, 10)  # no_sync() holds
        for ours, theirs in zip(seen["history"], expected["history"]):
            assert {k: pytest.approx(v, rel=1e-5, abs=1e-6) for k, v in ours.items() if k != "time"} == \
                   {k: v for k, v in theirs.items() if k != "time"}


# -- one process group per process, ranks that disagree, lr_find, resume (tests/distributed_runs.py) ------------------
import distributed_runs as runs  # noqa: E402
from trainloop_nb.callbacks.checkpoint import CheckpointError  # noqa: E402


def ranks_seen(out: Path, world: int = WORLD) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def repeated(tmp_path_factory):
    "`repeat` three times: lr_find then two fits in one process group used to hang or fail in 4 runs of 5."
    outs = [tmp_path_factory.mktemp(f"repeat{i}") for i in range(3)]
    for out in outs:
        run = torchrun(out, "repeat", script="distributed_runs.py", timeout=240)
        assert run.returncode == 0, run.stdout + run.stderr
    return [ranks_seen(out) for out in outs]


def test_lr_find_then_two_fits_share_one_process_group_every_time(repeated):
    for ranks in repeated:
        assert all(len(r["histories"][0]) == 2 and len(r["histories"][1]) == 1 and len(r["last"]) == 1 for r in ranks)
        assert ranks[0]["histories"] == ranks[1]["histories"]
        assert all(r["group_alive"] for r in ranks)  # kept between fits; destroyed at exit (the exit code is 0)
    assert repeated[0][0]["histories"] == repeated[1][0]["histories"] == repeated[2][0]["histories"]


def test_lr_find_gives_every_rank_one_suggestion_from_the_loss_over_all_ranks(repeated):
    found = [r["lr_find"] for r in repeated[0]]
    assert found[0] == found[1]  # the same rates, losses and suggestion on both ranks
    assert len(found[0]["rates"]) == runs.LR_STEPS and not found[0]["diverged"]  # every step taken, none short
    x, y = runs.data()
    net = runs.model()  # one process with both ranks' batch: its losses are the ranks' mean losses
    loop = runs.make_loop(net, training=TrainingEpochs((x[:runs.TRAIN], y[:runs.TRAIN]), runs.BATCH * WORLD, seed=3))
    alone = loop.lr_find(net, start_lr=1e-4, end_lr=0.5, num_steps=runs.LR_STEPS, device="cpu")
    assert found[0]["rates"] == alone.rates
    assert found[0]["losses"] == pytest.approx(alone.losses, rel=1e-5, abs=1e-6)


def test_ranks_with_different_numbers_of_batches_end_with_an_error_naming_them(repeated):
    for r in repeated[0]:
        assert "rank 0: 6 batches, rank 1: 5" in r["errors"]["sized"], r["errors"]["sized"]
        # data without len() cannot be counted first: DDP's join ends every rank when one runs out
        assert "different numbers of training batches" in r["errors"]["unsized"], r["errors"]["unsized"]


def test_a_validation_sampler_that_pads_is_refused_at_fit_start(repeated):
    for r in repeated[0]:
        message = r["errors"]["padded"]
        assert "DistributedSampler" in message and "33 samples" in message and "ValidationBatches" in message, message


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume")
    run = torchrun(out, "resume", script="distributed_runs.py", timeout=240)
    assert run.returncode == 0, run.stdout + run.stderr
    return out, run


def test_a_run_stopped_inside_training_resumes_with_every_ranks_sums(resumed):
    out, _ = resumed
    result = torch.load(out / "result.pt")
    assert result["resumed"] == result["uninterrupted"]  # was 0.2407 for epoch 2's train_loss instead of 0.2681
    assert all(torch.equal(result["resumed_weights"][k], v) for k, v in result["weights"].items())
    ranks = ranks_seen(out)
    assert all(r["equal"] for r in ranks)
    # every_steps=4: saved at steps 8 and 12 (epoch 2, batch 3). The stop at step 14 writes none under torchrun
    assert [r["checkpoints"] for r in ranks] == [["step-00000008.pt", "step-00000012.pt"]] * 2


def test_a_checkpoint_inside_a_phase_of_two_ranks_needs_two_ranks(resumed):
    out, _ = resumed
    net = runs.model()
    # the newest checkpoint, step 24 of the resumed run, is inside epoch 3's training
    with pytest.raises(CheckpointError, match=r"step-00000024.pt was written inside the training phase by 2 processes.*"
                                              r"torchrun --nproc_per_node=2"):
        runs.make_loop(net).fit(net, 3, device="cpu", resume_from=out / "checkpoints")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_without_a_shared_disk_resume_from_rank_zeros_checkpoint(tmp_path):
    "Two torchrun invocations on the loopback, one process each, each node in its own working folder."
    port, folders = free_port(), [tmp_path / "node0", tmp_path / "node1"]
    commands = []
    for node, folder in enumerate(folders):
        folder.mkdir()
        commands.append([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                         f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}",
                         str(HERE / "distributed_runs.py"), "nodes", str(folder)])
    finished = launch(commands, folders, timeout=240)
    assert all(f.returncode == 0 for f in finished), "\n".join(f.stdout + f.stderr for f in finished)
    ranks = [json.loads((folder / f"rank{r}.json").read_text()) for r, folder in enumerate(folders)]
    for r in ranks:  # a folder rank 0 lacks: the same error on every rank, naming the node
        assert "not-here" in r["missing"] and "node 0" in r["missing"] and "readable by rank 0" in r["missing"], r
        assert r["equal"] and not r["group_alive"]  # resumed on both nodes; leave_process_group() destroyed the group
    assert (folders[0] / "checkpoints").is_dir() and not (folders[1] / "checkpoints").exists()
