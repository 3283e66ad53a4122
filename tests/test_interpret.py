"""Interpretation (loop.interpret()): confusion matrix, report and MCC against scikit-learn on uneven batches,
binary and multiclass; per-sample and top losses against a hand computation; one pass without per-batch host
reads; the model left as it was; the pictures."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import classification_report, confusion_matrix, matthews_corrcoef
from torch import nn

from host_reads import count_host_reads
from trainloop_nb.data import Digits, ValidationBatches
from trainloop_nb.interpret import Interpretation, SampleTable, interpret_loop, interpret_model
from trainloop_nb.loop import TrainingLoop
from trainloop_nb.losses import mean_squared_error, sigmoid_cross_entropy, softmax_cross_entropy
from trainloop_nb.models import LeNet


def blobs(n: int, classes: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    centres = torch.randn(classes, 4, generator=g) * 2
    return centres[labels] + torch.randn(n, 4, generator=g), labels


def trained_classifier(classes: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    x, y = blobs(300, classes, seed + 1)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, classes))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(30):
        opt.zero_grad(); F.cross_entropy(model(x), y).backward(); opt.step()
    return model


def check_against_sklearn(interp: Interpretation, y_true: np.ndarray, y_pred: np.ndarray, classes: int) -> None:
    labels = list(range(classes))
    np.testing.assert_array_equal(interp.confusion_matrix(), confusion_matrix(y_true, y_pred, labels=labels))
    expected = classification_report(y_true, y_pred, labels=labels, target_names=interp.classes, output_dict=True,
                                      zero_division=0)
    got = interp.report().as_dict()
    assert got.pop("mcc") == pytest.approx(matthews_corrcoef(y_true, y_pred), abs=1e-12)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, dict):
            for metric, number in value.items(): assert got[key][metric] == pytest.approx(number, abs=1e-12), (key, metric)
        else: assert got[key] == pytest.approx(value, abs=1e-12), key


@pytest.mark.parametrize("classes", [3, 7])
@pytest.mark.parametrize("batch_size", [1, 13, 64, 500])
def test_multiclass_matches_sklearn_on_uneven_batches(classes, batch_size):
    model = trained_classifier(classes)
    x, y = blobs(137, classes, seed=5)  # 137 = uneven for every batch size above
    interp = interpret_model(model, ValidationBatches((x, y), batch_size), softmax_cross_entropy)
    # the model run on the same batches: another batch size may round the logits differently (and flip a near tie)
    with torch.no_grad(): logits = torch.cat([model(xb) for xb in x.split(batch_size)])
    np.testing.assert_array_equal(interp.targets.numpy(), y.numpy())
    np.testing.assert_array_equal(interp.predictions.numpy(), logits.argmax(1).numpy())
    torch.testing.assert_close(interp.losses, F.cross_entropy(logits, y, reduction="none"))
    torch.testing.assert_close(interp.probabilities, logits.softmax(1).max(1).values)
    assert interp.num_classes == classes and interp.classes == [str(i) for i in range(classes)]
    check_against_sklearn(interp, y.numpy(), logits.argmax(1).numpy(), classes)


def test_class_never_predicted_or_never_present():
    # a model that always says class 0: precision of the other classes is 0 (scikit-learn's zero_division=0)
    model = nn.Linear(4, 4)
    with torch.no_grad(): model.weight.zero_(); model.bias.copy_(torch.tensor([5.0, 0, 0, 0]))
    x = torch.randn(30, 4)
    y = torch.tensor([0, 1, 2] * 10)  # class 3 never present
    interp = interpret_model(model, ValidationBatches((x, y), 8), softmax_cross_entropy)
    check_against_sklearn(interp, y.numpy(), np.zeros(30, dtype=int), 4)
    assert interp.confusion_matrix()[3].sum() == 0 and interp.report().mcc == 0.0


@pytest.mark.parametrize("shape", ["[N, 1] float targets", "[N] long targets"])
def test_binary_one_logit_matches_sklearn(shape):
    torch.manual_seed(0)
    x, y = blobs(101, 2, seed=3)
    model = nn.Linear(4, 1) if shape.startswith("[N, 1]") else nn.Sequential(nn.Linear(4, 1), nn.Flatten(0))
    targets = y.float().unsqueeze(1) if shape.startswith("[N, 1]") else y
    interp = interpret_model(model, ValidationBatches((x, targets), 10), sigmoid_cross_entropy)
    with torch.no_grad(): logits = torch.cat([model(xb) for xb in x.split(10)]).reshape(-1)  # the same batches
    predicted = (logits >= 0).long()
    assert interp.num_classes == 2 and interp.targets.dtype == torch.int64 and interp.targets.shape == (101,)
    np.testing.assert_array_equal(interp.predictions.numpy(), predicted.numpy())
    torch.testing.assert_close(interp.losses, F.binary_cross_entropy_with_logits(logits, y.float(), reduction="none"))
    p = torch.sigmoid(logits)
    torch.testing.assert_close(interp.probabilities, torch.where(predicted == 1, p, 1 - p))
    check_against_sklearn(interp, y.numpy(), predicted.numpy(), 2)


def test_top_losses_by_hand():
    # logits chosen so the per-sample cross-entropies are known in order, with a tie between samples 1 and 4
    logits = torch.tensor([[3.0, 0, 0], [0, 0, 0], [0, 5.0, 0], [0, 0, 1.0], [0, 0, 0], [-4.0, 4.0, 0]])
    targets = torch.tensor([0, 2, 0, 2, 1, 0])
    model = nn.Identity()
    interp = interpret_model(model, ValidationBatches((logits, targets), 4), softmax_cross_entropy)
    def ce(row, t): return float(torch.logsumexp(row, 0) - row[t])  # by hand: log-sum-exp minus the target logit
    by_hand = sorted(((ce(logits[i], int(targets[i])), i) for i in range(6)), key=lambda p: (-p[0], p[1]))
    values, indices = interp.top_losses(4)
    assert indices.tolist() == [i for _, i in by_hand[:4]] == [5, 2, 1, 4]  # the tie in data order
    assert values.tolist() == pytest.approx([v for v, _ in by_hand[:4]], abs=1e-6)
    all_values, all_indices = interp.top_losses()
    assert len(all_values) == 6 and all_values.tolist() == sorted(all_values.tolist(), reverse=True)
    smallest = interp.top_losses(2, largest=False)[1].tolist()
    assert smallest == [i for _, i in by_hand[::-1][:2]] == [0, 3]
    with pytest.raises(ValueError, match="k must be"): interp.top_losses(0)


def test_one_pass_without_host_reads_per_batch():
    model = trained_classifier(5)
    x, y = blobs(200, 5)
    counts = []
    for batch_size in (50, 7):  # 4 and 29 batches: the count must not grow with the batches
        batches = ValidationBatches((x, y), batch_size)
        with count_host_reads() as count: interpret_model(model, batches, softmax_cross_entropy)
        counts.append(count[0])
    assert counts[0] == counts[1] == 0, counts
    passes = []
    class Counting(ValidationBatches):
        def __iter__(self):
            passes.append(1)
            return super().__iter__()
    interp = interpret_model(model, Counting((x, y), 7), softmax_cross_entropy)
    interp.top_losses(5); interp.report(); interp.confusion_matrix()
    assert len(passes) == 1


def test_model_left_as_it_was():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))
    model.train(); model[1].eval()
    x, y = blobs(50, 3)
    F.cross_entropy(model(x), y).backward()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    interp = interpret_model(model, ValidationBatches((x * 3 + 1, y), 16), softmax_cross_entropy)
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    model.eval()
    with torch.no_grad():  # eval mode: no dropout; the same batches of 16
        torch.testing.assert_close(interp.predictions, torch.cat([model(xb).argmax(1) for xb in (x * 3 + 1).split(16)]))


def test_loss_that_cannot_be_split_keeps_the_rest():
    def pairwise(output, target):
        if len(output) < 2: raise ValueError("pairwise needs two samples")
        return F.cross_entropy(output, target) + (output[0] - output[1]).pow(2).mean()
    model = trained_classifier(3)
    x, y = blobs(40, 3)
    interp = interpret_model(model, ValidationBatches((x, y), 8), pairwise)
    assert interp.losses is None and "cannot be split per sample" in interp.loss_problem
    assert interp.confusion_matrix().sum() == 40
    with pytest.raises(ValueError, match="per-sample losses are not available.*pairwise needs two samples"):
        interp.top_losses(3)


def test_loss_that_reads_the_host_is_split_sample_by_sample():
    def host(output, target): return F.cross_entropy(output, target) * (1.0 if output.sum().item() < 1e9 else 0.0)
    model = trained_classifier(3)
    x, y = blobs(20, 3)
    interp = interpret_model(model, ValidationBatches((x, y), 6), host)
    with torch.no_grad(): torch.testing.assert_close(interp.losses, F.cross_entropy(model(x), y, reduction="none"))


def test_regression_and_sequences():
    x = torch.randn(30, 3)
    target = x.sum(1, keepdim=True)
    reg = interpret_model(nn.Linear(3, 1), ValidationBatches((x, target + 0.5), 7), mean_squared_error)
    assert reg.num_classes is None and reg.losses.shape == (30,)
    with pytest.raises(ValueError, match="needs class targets"): reg.confusion_matrix()
    assert isinstance(reg.plot_top_losses(3), SampleTable)
    # a language model's [N, T, C] logits: per-sample loss is the mean over its tokens, as softmax_cross_entropy
    logits = torch.randn(10, 5, 7)
    tokens = torch.randint(0, 7, (10, 5))
    seq = interpret_model(nn.Identity(), ValidationBatches((logits, tokens), 4), softmax_cross_entropy)
    torch.testing.assert_close(seq.losses, F.cross_entropy(logits.transpose(1, 2), tokens, reduction="none").mean(1))
    assert seq.predictions.shape == (10, 5) and seq.confusion_matrix().sum() == 50


def digits_loop():
    "The digits demo's data, model and a quiet loop over them, seeded."
    torch.manual_seed(0)
    data = Digits(batch_size=64)
    model = LeNet(in_channels=1, num_classes=10, image_size=8)
    loop = TrainingLoop(data.training, data.validation, torch.optim.Adam(model.parameters(), lr=3e-3),
                        include_default_callbacks=False)
    return data, model, loop


def test_interpret_loop_on_digits_with_images():
    data, model, loop = digits_loop()
    with pytest.raises(ValueError, match="model=model"): interpret_loop(loop)
    before = interpret_loop(loop, model=model)
    loop.fit(model, epochs=2, device="cpu")
    interp = interpret_loop(loop, classes=data.classes)
    assert len(interp) == data.validation.sample_count and interp.classes == list(data.classes)
    # accuracy and the mean loss over the validation set, computed here in one batch
    xs, ys = zip(*data.validation)
    with torch.no_grad(): logits = model.eval()(torch.cat(xs))
    assert interp.report().accuracy == pytest.approx((logits.argmax(1) == torch.cat(ys)).float().mean().item())
    assert interp.losses.mean().item() == pytest.approx(F.cross_entropy(logits, torch.cat(ys)).item(), rel=1e-5)
    fig = interp.plot_top_losses(6)
    axes = [ax for ax in fig.axes if ax.images]
    assert len(axes) == 6
    values, indices = interp.top_losses(6)
    first = axes[0].get_title()
    pred, actual = first.split("\n")[0].split("/")
    i = int(indices[0])
    assert pred == data.classes[int(interp.predictions[i])] and actual == data.classes[int(interp.targets[i])]
    assert f"{float(values[0]):.2f}" in first
    torch.testing.assert_close(interp.input_of(i), torch.cat(xs)[i])
    cm = interp.plot_confusion_matrix(normalize=True)
    assert cm.axes[0].images[0].get_array().sum() == pytest.approx(10.0)  # each row sums to 1
    # data= another set; keep_inputs=False
    other = interpret_loop(loop, data=ValidationBatches(data.validation.dataset, 50), keep_inputs=False)
    assert torch.equal(other.predictions, interp.predictions) and other.inputs is None
    with pytest.raises(ValueError, match="inputs were not kept"): other.input_of(0)
    assert before.losses.mean() > interp.losses.mean()


def test_bad_arguments():
    model = nn.Linear(4, 3)
    loop = TrainingLoop([(torch.randn(2, 4), torch.tensor([0, 1]))], None, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match=r"loop.interpret\(data=...\)"): interpret_loop(loop, model=model)
    with pytest.raises(TypeError, match="pair \\(input, target\\)"):
        interpret_model(model, [torch.randn(2, 4)], softmax_cross_entropy)
    with pytest.raises(ValueError, match="no batches"): interpret_model(model, [], softmax_cross_entropy)
    interp = interpret_model(model, [(torch.randn(2, 4), torch.tensor([0, 1]))], softmax_cross_entropy)
    with pytest.raises(ValueError, match="2 class names given, but the model predicts 3"): interp.classes = ["a", "b"]
    bad = interpret_model(model, [(torch.randn(2, 4), torch.tensor([0, 5]))], lambda o, t: o.sum())
    with pytest.raises(ValueError, match="outside the 3 classes"): bad.confusion_matrix()


def test_loop_interpret_and_summary_are_the_views_of_the_loop():
    from trainloop_nb.summary import model_summary
    data, model, loop = digits_loop()
    with pytest.raises(ValueError, match="model=model"): loop.interpret()
    first_input = next(iter(data.validation))[0]
    assert loop.summary(model=model).total == model_summary(model, first_input).total == sum(p.numel() for p in model.parameters())
    loop.fit(model, epochs=1, device="cpu")
    assert [r.name for r in loop.summary().rows] == [r.name for r in model_summary(model, first_input).rows]
    assert (loop.interpret().confusion_matrix() == interpret_loop(loop).confusion_matrix()).all()
    assert torch.equal(loop.interpret(keep_inputs=False).predictions, interpret_loop(loop).predictions)
