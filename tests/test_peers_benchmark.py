"""benchmarks/peers.py does equal work in every contender it can run here, and skips a peer that is missing.
(No timings are checked: they belong to the benchmark, not to the tests.)"""
import importlib.util
import math
from pathlib import Path

import pytest
import torch

PEERS = Path(__file__).resolve().parent.parent / "benchmarks" / "peers.py"


@pytest.fixture(scope="module")
def peers():
    spec = importlib.util.spec_from_file_location("peers_benchmark", PEERS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield module
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tensors(peers): return peers.make_tensors()


def close(a, b): return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7)


def test_trainingloop_over_a_dataloader_computes_what_the_plain_loop_computes(peers, tensors):
    plain, loop = peers.plain_metrics(tensors, 1), peers.trainingloop_dataloader(tensors, 1)
    for key in ("train_loss", "train_accuracy", "valid_loss", "valid_accuracy"):
        assert close(plain[key], loop[key]), (key, plain[key], loop[key])


def test_trainingloop_over_trainingepochs_computes_what_the_loop_by_hand_computes(peers, tensors):
    by_hand, loop = peers.by_hand(tensors, 1), peers.trainingloop_epochs(tensors, 1)
    for key in ("train_loss", "train_accuracy", "valid_loss", "valid_accuracy"):
        assert close(by_hand[key], loop[key]), (key, by_hand[key], loop[key])


def test_the_plain_loop_validates_like_the_others_and_learns(peers, tensors):
    plain, with_metrics = peers.plain(tensors, 1), peers.plain_metrics(tensors, 1)
    assert "train_loss" not in plain and close(plain["valid_loss"], with_metrics["valid_loss"])
    assert plain["valid_accuracy"] > 0.3  # ten classes: well above chance after one epoch


def test_a_missing_peer_is_reported_and_left_out(peers, monkeypatch, capsys):
    monkeypatch.setitem(peers.CONTENDERS, "absent", ("Absent Trainer", None, "no_such_module_for_peers_test"))
    assert peers.available(["plain", "absent"]) == ["plain"]
    assert "Absent Trainer: skipped" in capsys.readouterr().err


def test_the_script_runs_end_to_end_on_the_contenders_without_peers(peers, capsys, tmp_path):
    table = tmp_path / "table.md"
    peers.main(["--repeats", "1", "--epochs", "2", "--only", "plain,trainingloop",
                "--markdown", str(table)])
    out = capsys.readouterr().out
    assert "| TrainingLoop (DataLoader) |" in out and "| plain loop (DataLoader) |" in out
    assert table.read_text().strip() == out.strip()


def test_unknown_contenders_are_refused(peers):
    with pytest.raises(SystemExit): peers.main(["--only", "plain,nonesuch"])


def test_the_stepwise_mode_stamps_every_batch_and_gives_both_targets(peers, capsys, tmp_path):
    "--steps: the plain loops and TrainingLoop stamp the same points; one round prints both targets' ratios."
    stamps = {}
    for name in ("plain_metrics", "trainingloop"):
        seen = stamps[name] = []
        peers.CONTENDERS[name][1](peers.make_tensors(), 1, stamp=seen.append)
    assert stamps["plain_metrics"] == stamps["trainingloop"] == ["training"] * peers.TRAIN_BATCHES + ["validation"] * peers.VALID_BATCHES
    table = tmp_path / "steps.md"
    peers.main(["--steps", "1", "--markdown", str(table)])
    text = table.read_text()
    assert text.count("target <= ") == 2 and "| TrainingLoop (DataLoader) |" in text and "| by hand (indexing tensors) |" in text
