"""benchmarks/instructions.py: the fits it counts differ by exactly the work it divides by, it reads callgrind's
dumps in the order they were written, and its slowed clocks run at the rate asked. (valgrind itself is not run
here: a counted run takes minutes; the counts belong to the benchmark, not to the tests.)"""
import importlib.util
import sys
import time
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCHMARKS))  # it imports its neighbours, step_cost and peers
    try:
        spec = importlib.util.spec_from_file_location("instructions_benchmark", BENCHMARKS / "instructions.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally: sys.path.remove(str(BENCHMARKS))
    threads = torch.get_num_threads()
    yield module
    torch.set_num_threads(threads)


@pytest.fixture
def real_clocks(monkeypatch):
    "The child slows time.time and time.monotonic: put them back afterwards."
    monkeypatch.setattr(time, "time", time.time)
    monkeypatch.setattr(time, "monotonic", time.monotonic)


def test_each_variant_is_counted_over_a_short_and_a_long_fit_that_differ_by_the_steps_asked(bench, real_clocks):
    names = ["hand", "defaults", "no printer", "no printer/watch", "hand, loss only", "loop, loss only"]
    assert list(bench.variants("unused", False)) == names
    counted = bench.child("step", names, 7, 1e9, False)
    assert [name for name, _ in counted] == [name for name in names for _ in range(2)]
    for (_, short), (_, long) in zip(counted[::2], counted[1::2]):
        assert (short, long) == (bench.SHORT, bench.SHORT + 7)  # every fit stamps each of its steps once


def test_each_pair_compared_does_the_same_arithmetic(bench):
    "Every variant trains to the hand loop's weights bit for bit, the loss-only pair included: only the work around differs."
    runs, data = bench.variants("unused", False), bench.data_of(40)
    weights = {}
    for name, run in runs.items():
        torch.manual_seed(0)
        data.set_epoch(0)
        model = torch.nn.Linear(4, 2)
        run(model, data, 1, stamps=[])
        weights[name] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert all(torch.equal(w, weights["hand"]) for w in weights.values())


def test_the_peers_job_counts_one_and_two_epoch_fits_of_each_contender(bench, real_clocks, monkeypatch):
    monkeypatch.setattr(bench.peers, "TRAIN_BATCHES", 3)  # the same job, smaller
    monkeypatch.setattr(bench.peers, "VALID_BATCHES", 2)
    names = bench.peers.target_contenders()
    assert names == ["plain_metrics", "by_hand", "trainingloop", "trainingloop_epochs"]
    counted = bench.child("peers", names, 0, 0.0, False)
    assert counted == [(name, n) for name in names for n in (1, 2)]


def test_dumps_are_read_in_the_order_callgrind_numbered_them(bench, tmp_path):
    totals = {1: 5_000_000, 2: 170, 3: 7_000_000, 9: 4_000_000, 10: 180, 11: 9_000_000}  # the small ones: starmap's end
    for number, total in totals.items():
        (tmp_path / f"callgrind.out.{number}").write_text(f"version: 1\ncmd: python\nevents: Ir\nsummary: {total}\n")
    assert bench.dump_totals(str(tmp_path / "callgrind.out")) == [5_000_000, 7_000_000, 4_000_000, 9_000_000]


def test_slowed_clocks_run_at_the_rate_asked(bench, real_clocks, monkeypatch):
    now = [1000.0]  # the "real" clocks the benchmark slows down: fakes, so the rate is checked exactly
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    monkeypatch.setattr(time, "time", lambda: 1.7e9 + now[0])
    bench.slowed_clocks(40.0)
    a, b = time.monotonic(), time.time()
    assert (a, b) == (1000.0, 1.7e9 + 1000.0)  # no jump when slowed
    now[0] += 10.0
    assert (time.monotonic() - a, time.time() - b) == (0.25, 0.25)  # 10 s of real time are 10 / 40 s
