"""Every metric against scikit-learn (or exp of the mean cross-entropy) on random data in uneven batches."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, matthews_corrcoef, top_k_accuracy_score

from trainloop_nb.metrics import (Accuracy, Loss, MatthewsCorrelation, Perplexity, TopKAccuracy, TorchMetric,
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


# --- running sums: values kept, added a group at a time ----------------------------------------------------------------
class DeviceOps(torch.utils._python_dispatch.TorchDispatchMode):
    "Counts the tensor operations run while it is active."
    def __init__(self): super().__init__(); self.count = 0
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def test_running_sums_do_no_device_work_until_a_group_is_full():
    "A batch's value is only kept; the group's 128 values are added with a few operations, not one a batch."
    m, values = Loss(), list(torch.rand(Loss.group, dtype=torch.float64).unbind())
    target = torch.zeros(4, dtype=torch.long)
    with DeviceOps() as ops:
        for v in values[:-1]: m.update(None, target, v)
    assert ops.count == 0 and len(m._values) == Loss.group - 1
    with DeviceOps() as ops: m.update(None, target, values[-1])
    assert 0 < ops.count <= 4 and m._values == []  # stack, convert, sum, scale by the batch size
    assert m.count == 4 * Loss.group and m.compute() == pytest.approx(torch.stack(values).mean().item(), rel=1e-15)


def test_running_sums_over_many_uneven_batches_equal_sklearn():
    "Hundreds of batches of changing sizes (runs of equal weights inside groups and across them), peeked at on the way."
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
        if i % 50 == 7: [m.value() for m in peeked] and [m.compute() for m in peeked]  # reading does not regroup
    assert len(sizes) > 3 * Loss.group
    loss, acc, top3, ppl = (m.compute() for m in metrics)
    assert acc == accuracy_score(target, output.argmax(1))
    assert top3 == pytest.approx(top_k_accuracy_score(target, output, k=3, labels=range(6)), abs=1e-15)
    assert loss == pytest.approx(expected_loss.item() / len(target), rel=1e-14)
    assert ppl == pytest.approx(math.exp(expected_loss.item() / len(target)), rel=1e-14)
    assert [torch.equal(a.total, b.total) for a, b in zip(metrics, peeked)] == [True] * 4


def test_running_sum_state_mid_group_continues_bitwise(tmp_path):
    "A state saved between groups' ends keeps the values not yet added: the sums go on bit for bit as if never saved."
    sizes = [3] * 150 + [5] * 149 + [2]  # runs of equal weights that cross the groups' ends
    regrouped_differs = []
    for seed in range(8):
        losses = torch.rand(300, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        whole, first = Loss(), Loss()
        for v, n in zip(losses[:200], sizes): whole.update(None, torch.zeros(n), v); first.update(None, torch.zeros(n), v)
        torch.save(first.state_dict(), tmp_path / "state.pt")
        second, regrouped = Loss(), Loss()
        second.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
        regrouped.load_state_dict({"total": first.total, "count": first.count})  # the state older versions saved
        for v, n in zip(losses[200:], sizes[200:]):
            for m in (whole, second, regrouped): m.update(None, torch.zeros(n), v)
        assert second.count == whole.count == regrouped.count == sum(sizes)
        assert second.total.item().hex() == whole.total.item().hex()
        assert regrouped.compute() == pytest.approx(whole.compute(), rel=1e-15)
        regrouped_differs.append(regrouped.total.item().hex() != whole.total.item().hex())
    # Adding the waiting values when saving groups them otherwise, and float64 sums depend on their order: the
    # bitwise check above would see it (the older state, which had no waiting values, shows the difference).
    assert any(regrouped_differs)


def test_running_sums_add_each_batch_where_read_every_batch():
    "group = 1 (a fit whose callbacks read the sums every batch): one op a batch, nothing kept, the same mean."
    values = list(torch.rand(300, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).unbind())
    grouped, each = Loss(), Loss()
    each.group = 1
    target = torch.zeros(3)
    for v in values[:150]: grouped.update(None, target, v); each.update(None, target, v)
    with DeviceOps() as ops: each.update(None, target, values[150])
    assert ops.count == 1 and each._values == []
    grouped.update(None, target, values[150])
    # a state saved with values waiting (by a fit without such readers) goes on adding each batch
    switched, state = Loss(), grouped.state_dict()
    switched.load_state_dict(state)
    switched.group = 1
    saved = {k: v.clone() for k, v in state.items() if isinstance(v, torch.Tensor)}
    for v in values[151:]:
        for m in (grouped, each, switched): m.update(None, target, v)
    assert switched._values == [] and grouped.count == each.count == switched.count == 900
    assert all(torch.equal(state[k], v) for k, v in saved.items())  # the sums are added to in place, not the state's
    at_group_end = Loss()
    for v in values[:Loss.group]: at_group_end.update(None, target, v)
    state = at_group_end.state_dict()
    assert state["values"] is None
    saved = state["sum"].clone()
    at_group_end.load_state_dict(state)
    at_group_end.group = 1
    at_group_end.update(None, target, values[0])
    assert torch.equal(state["sum"], saved)
    assert each.compute() == pytest.approx(grouped.compute(), rel=1e-15)
    assert switched.compute() == pytest.approx(grouped.compute(), rel=1e-15)


# --- hits: small outputs kept whole, counted a group at a time -----------------------------------------------------------
def test_hits_of_small_outputs_are_counted_a_group_at_once():
    "Accuracy and top-k keep a small output with its target (no device op) and count the group's hits in a few ops."
    g = torch.Generator().manual_seed(3)
    n = Accuracy.group
    output, target = torch.randn(n * 4, 6, generator=g), torch.randint(0, 6, (n * 4,), generator=g)
    grouped, each = [Accuracy(), TopKAccuracy(3)], [Accuracy(), TopKAccuracy(3)]
    for m in each: m.group = 1
    pairs = [(output[i * 4:(i + 1) * 4], target[i * 4:(i + 1) * 4]) for i in range(n)]
    with DeviceOps() as ops:
        for out, tgt in pairs[:-1]:
            for m in grouped: m.update(out, tgt, None)
    assert ops.count == 0 and [len(m._kept) for m in grouped] == [n - 1, n - 1]
    with DeviceOps() as ops:
        for m in grouped: m.update(*pairs[-1], None)
    assert 0 < ops.count <= 20 and [m._kept for m in grouped] == [[], []]  # cat, cat, argmax/topk, eq, (any,) sum, add
    for out, tgt in pairs:
        for m in each: m.update(out, tgt, None)
    assert grouped[0].compute() == each[0].compute() == accuracy_score(target, output.argmax(1))
    assert grouped[1].compute() == each[1].compute() == pytest.approx(
        top_k_accuracy_score(target, output, k=3, labels=range(6)), abs=1e-15)
    assert [m.count for m in grouped] == [m.count for m in each] == [n * 4] * 2


def test_hits_count_what_is_not_kept_at_its_batch():
    "Large outputs, views of a large storage, [N, T, C], int32 targets, sparse outputs, keep_bytes = 0: counted as they come."
    g = torch.Generator().manual_seed(4)
    cases = {"large": (torch.randn(64, 100, generator=g), torch.randint(0, 100, (64,), generator=g)),
             "view of a large storage": (torch.randn(8, 1000, 6, generator=g)[:, -1], torch.randint(0, 6, (8,), generator=g)),
             "[N, T, C]": (torch.randn(4, 5, 6, generator=g), torch.randint(0, 6, (4, 5), generator=g)),
             "int32 target": (torch.randn(4, 6, generator=g), torch.randint(0, 6, (4,), generator=g, dtype=torch.int32))}
    assert cases["large"][0].untyped_storage().nbytes() > Accuracy.keep_bytes
    for name, (out, tgt) in cases.items():
        m, tgt_flat = Accuracy(), tgt.reshape(-1)
        with DeviceOps() as ops: m.update(out, tgt, None)
        assert m._kept == [] and ops.count > 0, name
        assert m.compute() == accuracy_score(tgt_flat, out.reshape(tgt_flat.numel(), -1).argmax(1)), name
    sparse, each = Accuracy(), Accuracy()  # no one storage to judge: counted at its batch, with torch's own error
    each.group = 1
    errors = []
    for m in (sparse, each):
        with pytest.raises(RuntimeError) as caught: m.update(torch.randn(4, 6).to_sparse(), torch.zeros(4, dtype=torch.long), None)
        errors.append((type(caught.value), str(caught.value)))
    assert errors[0] == errors[1] and "argmax" in errors[0][1]
    switched_off = Accuracy()
    switched_off.keep_bytes = 0  # every batch counted as it comes
    with DeviceOps() as ops: switched_off.update(torch.randn(4, 6, generator=g), torch.randint(0, 6, (4,), generator=g), None)
    assert switched_off._kept == [] and ops.count > 0


def test_hits_read_every_batch_keep_no_more_than_a_group_waiting():
    "A reader between batches counts the kept outputs into a waiting value each time: they still add up a group at a time."
    g = torch.Generator().manual_seed(7)
    m, waiting, outs, tgts = Accuracy(), [], [], []
    for _ in range(3 * Accuracy.group):
        out, tgt = torch.randn(4, 3, generator=g), torch.randint(0, 3, (4,), generator=g)
        m.update(out, tgt, None)
        m.compute()
        waiting.append(len(m._values) + len(m._kept))
        outs.append(out); tgts.append(tgt)
    assert max(waiting) == Accuracy.group - 1 and m._kept == []
    assert m.compute() == accuracy_score(torch.cat(tgts), torch.cat(outs).argmax(1))


def test_hits_kept_in_mixed_shapes_equal_sklearn():
    "Kept outputs that cannot be concatenated ([N] and [N, 1] binary logits, classes changing) are counted batch by batch."
    g = torch.Generator().manual_seed(5)
    binary, counted = Accuracy(), []
    for i in range(10):
        logits, tgt = torch.randn(3 + i % 4, generator=g), torch.randint(0, 2, (3 + i % 4,), generator=g)
        binary.update(logits if i % 2 else logits[:, None], tgt, None)
        counted += list(zip((logits >= 0).long().tolist(), tgt.tolist()))
    assert len(binary._kept) == 10
    pred, true = zip(*counted)
    assert binary.compute() == accuracy_score(true, pred)
    widths, outs, tgts = Accuracy(), [], []
    for c in (3, 5, 3, 7):
        out, tgt = torch.randn(4, c, generator=g), torch.randint(0, 3, (4,), generator=g)
        widths.update(out, tgt, None); outs.append(out.argmax(1)); tgts.append(tgt)
    assert len(widths._kept) == 4 and widths.compute() == accuracy_score(torch.cat(tgts), torch.cat(outs))


def test_hits_state_mid_group_continues_exactly(tmp_path):
    "A state saved with outputs kept counts them into its waiting values; the run goes on to the same count."
    g = torch.Generator().manual_seed(6)
    pairs = [(torch.randn(4, 6, generator=g), torch.randint(0, 6, (4,), generator=g)) for _ in range(300)]
    whole, first = Accuracy(), Accuracy()
    for out, tgt in pairs[:200]:
        for m in (whole, first): m.update(out, tgt, None)
    assert len(first._kept) == 200 - Accuracy.group
    torch.save(first.state_dict(), tmp_path / "state.pt")
    second = Accuracy()
    second.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    for out, tgt in pairs[200:]:
        for m in (whole, second): m.update(out, tgt, None)
    assert torch.equal(second.total, whole.total) and second.count == whole.count == 1200
    outputs, targets = map(torch.cat, zip(*pairs))
    assert whole.compute() == accuracy_score(targets, outputs.argmax(1))
