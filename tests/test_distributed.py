"""The same script under `torchrun --nproc_per_node=2` (gloo, CPU): what one process with the doubled batch does.

Three launches in all (each costs seconds of process start-up): one fit with gradient accumulation, the same
fit with compile=True, one with a failing rank. The script is tests/distributed_fit.py.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

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


def torchrun(out: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
               str(HERE / "distributed_fit.py"), str(out), *args]
    # the timeout is the guard against a hang: a run that waits forever on a collective fails the test
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=HERE)


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
    assert not any(r["group_alive"] for r in ranks)  # the loop made the process group, so it destroyed it
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
