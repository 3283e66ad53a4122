"""Every metric against scikit-learn (or exp of the mean cross-entropy) on random data in uneven batches."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, matthews_corrcoef, top_k_accuracy_score

from trainloop_nb.metrics import (IGNORE_INDEX, Accuracy, Loss, MatthewsCorrelation, Perplexity, TopKAccuracy, TorchMetric,
                                  make_metrics, matthews_from_confusion)

# scikit-learn's own warnings about the edge cases tested on purpose (k >= classes, a single label)
pytestmark = [pytest.mark.filterwarnings("ignore:'k' \\(5\\) greater than"),
              pytest.mark.filterwarnings("ignore:A single label was found")]

UNEVEN = [1, 7, 64, 3, 50, 128, 2]  # batch sizes, the last batch short as in real validation sets


def batches(n_total, sizes=UNEVEN):
    edges = np.cumsum(sizes)[:-1]
    assert sum(sizes) == n_total
    return torch.tensor_split(torch.arange(n_total), torch.tensor(edges))


def run(metrics, output, target, loss_func):
    for m in metrics: m.reset()
    for idx in batches(len(target)):
        out, tgt = output[idx], target[idx]
        loss = loss_func(out, tgt)
        for m in metrics: m.update(out, tgt, loss)
    return [m.compute() for m in metrics]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("classes", [3, 10])
def test_multiclass_metrics_equal_sklearn(seed, classes):
    g = torch.Generator().manual_seed(seed)
    n = sum(UNEVEN)
    output = torch.randn(n, classes, generator=g)
    target = torch.randint(0, classes, (n,), generator=g)
    # make predictions better than chance so MCC is not near 0 by accident
    output[torch.arange(n)[: n // 2], target[: n // 2]] += 2
    acc, top5, mcc, loss = run([Accuracy(), TopKAccuracy(5), MatthewsCorrelation(), Loss()], output, target, F.cross_entropy)
    pred = output.argmax(1).numpy()
    assert acc == pytest.approx(accuracy_score(target, pred), abs=1e-12)
    assert top5 == pytest.approx(top_k_accuracy_score(target, output.numpy(), k=5, labels=range(classes)), abs=1e-12)
    assert mcc == pytest.approx(matthews_corrcoef(target, pred), abs=1e-12)
    assert loss == pytest.approx(F.cross_entropy(output.double(), target).item(), rel=1e-6)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("shape", ["[N]", "[N, 1]"])
def test_binary_metrics_equal_sklearn(seed, shape):
    g = torch.Generator().manual_seed(seed)
    n = sum(UNEVEN)
    target = torch.randint(0, 2, (n,), generator=g)
    logits = torch.randn(n, generator=g) + (target * 2 - 1) * 0.8
    output = logits if shape == "[N]" else logits[:, None]
    loss_func = lambda o, t: F.binary_cross_entropy_with_logits(o.reshape(-1), t.float())
    acc, mcc = run([Accuracy(), MatthewsCorrelation()], output, target, loss_func)
    pred = (logits >= 0).long().numpy()
    assert acc == pytest.approx(accuracy_score(target, pred), abs=1e-12)
    assert mcc == pytest.approx(matthews_corrcoef(target, pred), abs=1e-12)


def test_binary_threshold_counts_zero_as_positive():
    m = Accuracy()
    m.update(torch.tensor([0.0, -0.0001]), torch.tensor([1, 0]), torch.tensor(0.0))
    assert m.compute() == 1.0


def test_mcc_is_zero_where_undefined_as_in_sklearn():
    target = torch.tensor([1, 1, 1, 1])
    m = MatthewsCorrelation()
    m.update(torch.tensor([[0.0, 1.0]] * 4), target, torch.tensor(0.0))
    assert m.compute() == 0.0 == matthews_corrcoef(target, [1, 1, 1, 1])
    assert math.isnan(MatthewsCorrelation().compute())  # nothing seen yet


def test_mcc_from_a_known_confusion_matrix():
    # rows true, columns predicted; sklearn from the expanded labels
    c = torch.tensor([[5, 1, 0], [2, 3, 1], [0, 2, 6]])
    y_true = np.repeat([0, 0, 0, 1, 1, 1, 2, 2, 2], c.flatten().numpy())
    y_pred = np.repeat([0, 1, 2, 0, 1, 2, 0, 1, 2], c.flatten().numpy())
    assert matthews_from_confusion(c) == pytest.approx(matthews_corrcoef(y_true, y_pred), abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_perplexity_is_exp_of_token_weighted_mean_cross_entropy(seed):
    g = torch.Generator().manual_seed(seed)
    sizes = [3, 1, 4, 2]  # sequences per batch
    n, t, v = sum(sizes), 7, 11
    output, target = torch.randn(n, t, v, generator=g), torch.randint(0, v, (n, t), generator=g)
    ppl, acc = Perplexity(), Accuracy()
    for idx in torch.tensor_split(torch.arange(n), torch.tensor(np.cumsum(sizes)[:-1])):
        loss = F.cross_entropy(output[idx].reshape(-1, v), target[idx].reshape(-1))
        ppl.update(output[idx], target[idx], loss); acc.update(output[idx], target[idx], loss)
    expected = math.exp(F.cross_entropy(output.reshape(-1, v).double(), target.reshape(-1)).item())
    assert ppl.compute() == pytest.approx(expected, rel=1e-6)
    assert acc.compute() == pytest.approx(accuracy_score(target.reshape(-1), output.argmax(-1).reshape(-1)), abs=1e-12)


def test_reset_starts_a_new_phase():
    m = Accuracy()
    m.update(torch.tensor([[1.0, 0.0]]), torch.tensor([0]), torch.tensor(0.0))
    m.reset()
    m.update(torch.tensor([[1.0, 0.0]]), torch.tensor([1]), torch.tensor(0.0))
    assert m.compute() == 0.0


def test_torchmetrics_objects_are_accepted():
    torchmetrics = pytest.importorskip("torchmetrics")
    (loss, tm), = [make_metrics([torchmetrics.classification.MulticlassAccuracy(num_classes=4, average="micro")])]
    g = torch.Generator().manual_seed(0)
    output, target = torch.randn(255, 4, generator=g), torch.randint(0, 4, (255,), generator=g)
    (value,) = run([tm], output, target, F.cross_entropy)
    assert isinstance(tm, TorchMetric) and tm.name == "multiclass_accuracy"
    assert value == pytest.approx(accuracy_score(target, output.argmax(1)), abs=1e-6)


def test_bad_metric_inputs_say_what_to_do():
    with pytest.raises(ValueError, match="valid names are: .*accuracy.*mcc"):
        make_metrics(["f1"])
    with pytest.raises(ValueError, match="unique"):
        make_metrics([Accuracy(), "accuracy"])
    with pytest.raises(ValueError, match="use 'accuracy' for binary"):
        TopKAccuracy(5).update(torch.zeros(3), torch.zeros(3), torch.tensor(0.0))
    for binary in (torch.zeros(3), torch.zeros(3, 1)):  # small and with class indices, yet refused at its batch
        with pytest.raises(ValueError, match="use 'accuracy' for binary"):
            TopKAccuracy(5).update(binary, torch.zeros(3, dtype=torch.long), torch.tensor(0.0))
    with pytest.raises(ValueError, match="target has 6 values but the output gives 3 predictions"):
        Accuracy().update(torch.zeros(3, 4), torch.zeros(3, 2), torch.tensor(0.0))

# --- nothing borrowed outlives its batch ---------------------------------------------------------------------------------
ALL = (Loss, Accuracy, lambda: TopKAccuracy(3), MatthewsCorrelation, Perplexity)


def reference_values(outputs, targets, losses):
    "Every metric's value from the whole phase at once: scikit-learn's, or the weighted mean loss."
    output, target = torch.cat(outputs), torch.cat(targets)
    weights = torch.tensor([len(t) for t in targets], dtype=torch.float64)
    mean_loss = (torch.stack(losses).double() * weights).sum().item() / weights.sum().item()
    return [mean_loss, accuracy_score(target, output.argmax(1)),
            top_k_accuracy_score(target, output, k=3, labels=range(6)), matthews_corrcoef(target, output.argmax(1)),
            math.exp(mean_loss)]


@pytest.mark.parametrize("reads", ["never", "every batch"])
def test_metrics_never_depend_on_what_happens_to_a_tensor_after_its_batch(reads):
    "Outputs, targets and losses refilled in place after each batch (through torch and through numpy): the same numbers."
    g = torch.Generator().manual_seed(8)
    sizes = [4] * 300 + [3]  # more than a group of batches, the last one short
    outputs = [torch.randn(n, 6, generator=g) for n in sizes]
    targets = [torch.randint(0, 6, (n,), generator=g) for n in sizes]
    losses = [F.cross_entropy(o, t) for o, t in zip(outputs, targets)]
    fresh, reused = [make() for make in ALL], [make() for make in ALL]
    out_buffer, loss_buffer = torch.empty(4, 6), torch.empty(())
    target_array = np.empty(4, dtype=np.int64)
    target_buffer = torch.from_numpy(target_array)  # numpy writes bump no version counter
    for out, tgt, loss in zip(outputs, targets, losses):
        n = len(tgt)
        for m in fresh: m.update(out.clone(), tgt.clone(), loss.clone())
        target_array[:n] = tgt.numpy()
        batch = (out_buffer[:n].copy_(out), target_buffer[:n], loss_buffer.copy_(loss))
        for m in reused: m.update(*batch)
        if reads == "every batch": [m.value() for m in reused]
        out_buffer.normal_(generator=g); target_array[:] = 5; loss_buffer.fill_(7.0)  # the next batch's refill
    expected = reference_values(outputs, targets, losses)
    for m, f, want in zip(reused, fresh, expected):
        assert m.compute() == f.compute(), m.name  # the same code on the same numbers: the same bits
        assert m.compute() == pytest.approx(want, rel=1e-12, abs=1e-12), m.name


def test_ignored_targets_are_left_out_of_every_metric():
    "Targets of -100 (what softmax_cross_entropy ignores) count nowhere: every metric equals its value on the others."
    g = torch.Generator().manual_seed(9)
    output, target = torch.randn(2, 40, 6, generator=g), torch.randint(0, 6, (2, 40), generator=g)
    ignored = torch.rand(2, 40, generator=g) < 0.3
    masked = target.masked_fill(ignored, IGNORE_INDEX)
    metrics = [Accuracy(), TopKAccuracy(3), MatthewsCorrelation(), Perplexity()]
    for i in range(2):  # two batches of [1, 40] tokens
        loss = F.cross_entropy(output[i], masked[i])  # the mean over the counted tokens
        for m in metrics: m.update(output[i:i + 1], masked[i:i + 1], loss)
    keep = ~ignored.reshape(-1)
    out, tgt = output.reshape(-1, 6)[keep], target.reshape(-1)[keep]
    acc, top3, mcc, ppl = (m.compute() for m in metrics)
    assert acc == accuracy_score(tgt, out.argmax(1))
    assert top3 == pytest.approx(top_k_accuracy_score(tgt, out, k=3, labels=range(6)), abs=1e-12)
    assert mcc == pytest.approx(matthews_corrcoef(tgt, out.argmax(1)), abs=1e-12)
    assert ppl == pytest.approx(math.exp(F.cross_entropy(out, tgt).item()), rel=1e-6)
    everything_ignored = Accuracy()
    everything_ignored.update(torch.randn(3, 6), torch.full((3,), IGNORE_INDEX), None)
    assert math.isnan(everything_ignored.compute())


def test_class_metrics_refuse_float_targets_but_binary_ones_compare_exactly():
    "2.7 is not a class: refused where classes are scored. Binary logits take 0/1 floats; a soft 0.7 matches neither."
    for m in (Accuracy(), TopKAccuracy(3), MatthewsCorrelation()):
        with pytest.raises(ValueError, match="class indices"):
            m.update(torch.randn(3, 6), torch.tensor([0.0, 2.7, 5.0]), None)
    binary_logits, targets = torch.tensor([2.0, -1.0, 3.0, -2.0]), torch.tensor([1.0, 0.0, 0.7, 1.0])
    acc, mcc = Accuracy(), MatthewsCorrelation()
    for m in (acc, mcc): m.update(binary_logits, targets, None)
    assert acc.compute() == 0.5  # hits: 1.0 and 0.0; the soft 0.7 and the wrong 1.0 are misses
    assert mcc.compute() == pytest.approx(matthews_corrcoef([1, 0, 1], [1, 0, 0]))  # the soft target has no row


def test_running_sums_over_many_uneven_batches_equal_sklearn():
    "Hundreds of batches of changing sizes, read on the way: the values of the whole phase."
    g = torch.Generator().manual_seed(0)
    sizes = [s for s in torch.randint(1, 6, (90,), generator=g).tolist() for _ in range(int(torch.randint(1, 9, (), generator=g)))]
    output, target = torch.randn(sum(sizes), 6, generator=g), torch.randint(0, 6, (sum(sizes),), generator=g)
    metrics, peeked = [Loss(), Accuracy(), TopKAccuracy(3), Perplexity()], [Loss(), Accuracy(), TopKAccuracy(3), Perplexity()]
    expected_loss = torch.zeros((), dtype=torch.float64)
    for i, idx in enumerate(batches(len(target), sizes)):
        out, tgt = output[idx], target[idx]
        loss = F.cross_entropy(out, tgt)
        expected_loss += loss.double() * len(idx)
        for m in metrics + peeked: m.update(out, tgt, loss)
        if i % 50 == 7: [m.value() for m in peeked] and [m.compute() for m in peeked]
    assert len(sizes) > 300
    loss, acc, top3, ppl = (m.compute() for m in metrics)
    assert acc == accuracy_score(target, output.argmax(1))
    assert top3 == pytest.approx(top_k_accuracy_score(target, output, k=3, labels=range(6)), abs=1e-15)
    assert loss == pytest.approx(expected_loss.item() / len(target), rel=1e-14)
    assert ppl == pytest.approx(math.exp(expected_loss.item() / len(target)), rel=1e-14)
    assert [a.compute() == b.compute() for a, b in zip(metrics, peeked)] == [True] * 4  # reading changes nothing


def test_state_mid_phase_continues_bitwise(tmp_path):
    "A state saved mid-phase (mid-group too), loaded into new metrics, goes on to the same bits as never saved."
    g = torch.Generator().manual_seed(6)
    pairs = [(torch.randn(n, 6, generator=g), torch.randint(0, 6, (n,), generator=g)) for n in [4] * 299 + [2]]
    whole, first = [make() for make in ALL], [make() for make in ALL]
    for out, tgt in pairs[:200]:
        for m in whole + first: m.update(out, tgt, F.cross_entropy(out, tgt))
    torch.save([m.state_dict() for m in first], tmp_path / "state.pt")
    second = [make() for make in ALL]
    for m, state in zip(second, torch.load(tmp_path / "state.pt", weights_only=True)): m.load_state_dict(state)
    for out, tgt in pairs[200:]:
        for m in whole + second: m.update(out, tgt, F.cross_entropy(out, tgt))
    assert [m.compute() for m in second] == [m.compute() for m in whole]
    with pytest.raises(ValueError, match="'total' and 'count'"): Loss().load_state_dict({"sum": 1.0})
