"""`loop.validate` and `loop.predict` (issue 21): exact metrics on any batching against scikit-learn and a hand loop,
predictions in data order for every batch form, the loop left as found, and under torchrun (2 gloo processes)
every rank getting every prediction in data order."""
import math
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, matthews_corrcoef

from trainloop_nb.callbacks.logging import CSVLogger
from trainloop_nb.callbacks.progress import ProgressPrinter
from trainloop_nb.core import Callback
from trainloop_nb.data import TrainingEpochs, ValidationBatches
from trainloop_nb.loop import TrainingLoop

HERE = Path(__file__).parent


def classification(n=230, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return x, (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()


def network():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 3))


def fitted(callbacks=()):
    x, y = classification()
    net = network()
    loop = TrainingLoop(TrainingEpochs((x[:150], y[:150]), 16, seed=0), ValidationBatches((x[150:], y[150:]), 32),
                        torch.optim.Adam(net.parameters(), lr=1e-2), metrics=["accuracy", "mcc"],
                        callbacks=list(callbacks), include_default_callbacks=False)
    loop.fit(net, 3, device="cpu")
    return loop, net, x[150:], y[150:]


def hand_logits(net, x):
    modes = [m.training for m in net.modules()]
    net.eval()
    with torch.no_grad(): logits = net(x)
    for m, mode in zip(net.modules(), modes): m.training = mode
    return logits


@pytest.mark.parametrize("batch_size", [1, 7, 32, 80])
def test_validate_is_exact_on_any_batching_and_changes_nothing(batch_size):
    loop, net, x, y = fitted()
    history, stats, phase, model = [dict(h) for h in loop.history], loop.last_stats, loop.phase, loop.model
    scores = loop.validate(ValidationBatches((x, y), batch_size))
    logits = hand_logits(net, x)
    assert scores["loss"] == pytest.approx(F.cross_entropy(logits.double(), y).item(), rel=1e-6)
    assert scores["accuracy"] == pytest.approx(accuracy_score(y, logits.argmax(1)), abs=1e-12)
    assert scores["mcc"] == pytest.approx(matthews_corrcoef(y, logits.argmax(1)), abs=1e-9)
    assert loop.history == history and loop.last_stats == stats and loop.phase is phase and loop.model is model
    assert loop.validate() == pytest.approx({k: history[-1][f"valid_{k}"] for k in scores}, rel=1e-9)


def test_validate_before_any_fit_with_a_model_leaves_the_loop_and_the_model_as_they_were():
    x, y = classification()
    net = network()
    net[2].eval()  # one module in eval mode (a frozen block): it stays so, the others stay in train mode
    loop = TrainingLoop([(x[:16], y[:16])], ValidationBatches((x, y), 50), torch.optim.SGD(net.parameters(), lr=0.1),
                        metrics=["accuracy"], include_default_callbacks=False)
    scores = loop.validate(model=net)
    assert scores["accuracy"] == pytest.approx(accuracy_score(y, hand_logits(net, x).argmax(1)), abs=1e-12)
    assert loop.model is None and loop.device is None and loop.phase is None and loop.history == []
    assert [m.training for m in net.modules()] == [True, True, True, False, True]
    with pytest.raises(ValueError, match=r"no model yet .* loop.validate\(model=model\)"):
        loop.validate()
    with pytest.raises(ValueError, match=r"no validation data; pass the batches: loop.predict\(data=...\)"):
        TrainingLoop([(x, y)], None, torch.optim.SGD(net.parameters(), lr=0.1)).predict(model=net)


class Recorder(Callback):
    def __init__(self): self.events = []
    def validation_start(self, loop): self.events.append(("validation_start", str(loop.phase), loop.batch_count))
    def inference_prediction_end(self, loop): self.events.append(("prediction", loop.batch_index))
    def batch_end(self, loop):
        if loop.phase == "validation": self.events.append(("batch_end", loop.batch_index, len(loop.last_step_target)))
    def validation_end(self, loop): self.events.append(("validation_end", loop.last_stats["accuracy"]))


def test_validate_fires_the_validation_events_and_bars_and_loggers_keep_working(tmp_path):
    recorder, printed = Recorder(), tmp_path / "printed.txt"
    with open(printed, "w") as file:
        loop, net, x, y = fitted([recorder, ProgressPrinter(mode="plain", file=file),
                                  CSVLogger(tmp_path / "log.csv")])
        logged = (tmp_path / "log.csv").read_text()
        recorder.events.clear()
        scores = loop.validate(ValidationBatches((x, y), 50))
    assert recorder.events == [("validation_start", "validation", 2), ("prediction", 0), ("batch_end", 0, 50),
                               ("prediction", 1), ("batch_end", 1, 30), ("validation_end", scores["accuracy"])]
    assert (tmp_path / "log.csv").read_text() == logged  # a CSV log is a fit's: validate writes no rows to it


def test_a_callback_cancelling_a_batch_leaves_it_out_of_the_metrics():
    from trainloop_nb.core import CancelBatch
    class SkipFirst(Callback):
        def batch_start(self, loop):
            if loop.phase == "validation" and loop.batch_index == 0: raise CancelBatch
    loop, net, x, y = fitted()
    loop.callbacks.append(SkipFirst())
    scores = loop.validate(ValidationBatches((x, y), 30))
    logits = hand_logits(net, x[30:])
    assert scores["accuracy"] == pytest.approx(accuracy_score(y[30:], logits.argmax(1)), abs=1e-12)


def test_predict_gives_every_sample_in_data_order_for_every_batch_form():
    loop, net, x, y = fitted()
    logits = hand_logits(net, x)
    assert torch.allclose(loop.predict(), logits, atol=1e-6)
    chunks = [(x[i:i + 13], y[i:i + 13]) for i in range(0, 80, 13)]
    forms = {"bare": [c[0] for c in chunks], "one-tuple": [(c[0],) for c in chunks], "pair": chunks}
    for name, batches in forms.items():
        predicted = loop.predict(batches)
        assert predicted.device.type == "cpu" and torch.allclose(predicted, logits, atol=1e-6), name
    probabilities, targets = loop.predict(chunks, act=partial(torch.softmax, dim=-1), with_targets=True)
    assert torch.allclose(probabilities, torch.softmax(logits, -1), atol=1e-6) and torch.equal(targets, y)
    with pytest.raises(ValueError, match="batch 1 has no target"):
        loop.predict(forms["bare"], with_targets=True)
    with pytest.raises(TypeError, match="a tensor, \\(input,\\), \\(input, target\\) or a mapping"):
        loop.predict([(x, y, y)])


def test_predict_with_mappings_pads_sequences_of_different_lengths_as_hugging_face_does():
    class Tagger(torch.nn.Module):  # one score per token, as a token classifier's logits
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 2)
        def forward(self, input_ids, labels=None): return {"logits": self.embed(input_ids)}
    tagger = Tagger()
    batches = [{"input_ids": torch.tensor([[1, 2, 3]]), "labels": torch.tensor([[0, 1, 1]])},
               {"input_ids": torch.tensor([[4, 5], [6, 7]]), "labels": torch.tensor([[1, 0], [0, -100]])}]
    loop = TrainingLoop(batches, batches, torch.optim.SGD(tagger.parameters(), lr=0.1), include_default_callbacks=False)
    predictions, targets = loop.predict(model=tagger, with_targets=True)
    weights = tagger.embed.weight.detach()
    assert predictions.shape == (3, 3, 2) and torch.equal(predictions[0], weights[torch.tensor([1, 2, 3])])
    assert torch.equal(predictions[1:, :2], weights[torch.tensor([[4, 5], [6, 7]])]) and (predictions[1:, 2] == -100).all()
    assert targets.tolist() == [[0, 1, 1], [1, 0, -100], [0, -100, -100]]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no torch.distributed with gloo")
def test_under_torchrun_every_rank_gets_every_prediction_in_data_order_and_the_exact_metrics(tmp_path):
    from test_distributed import torchrun  # the launcher that kills a whole launch on timeout
    run = torchrun(tmp_path, script="distributed_evaluate.py", timeout=240)
    assert run.returncode == 0, run.stdout + run.stderr
    import distributed_evaluate as script
    x, y = script.data()
    logits = hand_logits(script.model(), x)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    for r in ranks:
        for name, got in r["results"].items():
            assert torch.allclose(got["predictions"], logits, atol=1e-6) and torch.equal(got["targets"], y), name
            assert got["validate"]["accuracy"] == pytest.approx(accuracy_score(y, logits.argmax(1)), abs=1e-12), name
            assert got["validate"]["loss"] == pytest.approx(F.cross_entropy(logits.double(), y).item(), rel=1e-6)
            assert got["validate"]["mcc"] == pytest.approx(matthews_corrcoef(y, logits.argmax(1)), abs=1e-9), name


def test_validate_shows_a_progress_bar_of_its_own_outside_a_fit(capsys):
    x, y = classification()
    net = network()
    loop = TrainingLoop([(x, y)], ValidationBatches((x, y), 100), torch.optim.SGD(net.parameters(), lr=0.1),
                        callbacks=[ProgressPrinter(mode="terminal")], include_default_callbacks=False)
    capsys.readouterr()
    loop.validate(model=net)
    assert "100.00% [3/3" in capsys.readouterr().out
