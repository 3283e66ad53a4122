"""fit(precision=, accumulate_steps=, compile=) in one process: each against what plain PyTorch or a bigger batch gives."""
import math

import pytest
import torch
import torch.nn.functional as F

from trainloop_nb.core import Callback, CancelBatch
from trainloop_nb.data import TrainingEpochs, ValidationBatches
from trainloop_nb.loop import TrainingLoop
from trainloop_nb.metrics import make_metrics

from toy_runs import cxx_compiler, toy_data

FEATURES, CLASSES = 5, 3


class Steps(Callback):
    "Where update_start fired: (epoch, batch, step) each time."
    def __init__(self): self.updates = []
    def update_start(self, loop): self.updates.append((loop.epoch_index, loop.batch_index, loop.step))


def fit(samples, batch_size, epochs=2, drop_last=True, callbacks=(), training=None, validation=True, momentum=0.9, **options):
    x, y = toy_data(samples + 40, FEATURES, CLASSES, seed=2)
    torch.manual_seed(0)
    model = torch.nn.Linear(FEATURES, CLASSES)
    training = training(x[:samples], y[:samples]) if training else TrainingEpochs((x[:samples], y[:samples]), batch_size,
                                                                                 drop_last=drop_last, seed=5)
    loop = TrainingLoop(training, ValidationBatches((x[samples:], y[samples:]), 16) if validation else None,
                        torch.optim.SGD(model.parameters(), lr=0.3, momentum=momentum), metrics=["accuracy", "mcc"],
                        callbacks=list(callbacks), include_default_callbacks=False)
    loop.fit(model, epochs, device="cpu", **options)
    return model, loop


def assert_same_weights(a, b, **tolerance):
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, **tolerance, msg=name)


# --- gradient accumulation -------------------------------------------------------------------------
def test_accumulated_micro_batches_step_like_one_batch_of_their_samples():
    steps = Steps()
    small, accumulated = fit(96, 8, accumulate_steps=4, callbacks=[steps])
    big, whole = fit(96, 32)
    assert_same_weights(small, big)
    assert accumulated.step == whole.step == 6  # real steps: 3 per epoch
    # update_start fires once per real step, on the last batch of each group of 4, before the step is counted
    assert steps.updates == [(0, 3, 0), (0, 7, 1), (0, 11, 2), (1, 3, 3), (1, 7, 4), (1, 11, 5)]
    for ours, theirs in zip(accumulated.history, whole.history):  # the same samples at the same weights
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-6)
        assert ours["train_accuracy"] == theirs["train_accuracy"]


def test_a_short_last_group_steps_with_the_mean_of_its_batches():
    # 88 samples: 11 batches of 8, groups of 4, 4, 3. The single-process oracle: batches of 32, 32 and 24 samples.
    steps = Steps()
    small, accumulated = fit(88, 8, accumulate_steps=4, callbacks=[steps])
    big, whole = fit(88, 32, drop_last=False)
    assert [u[1] for u in steps.updates] == [3, 7, 10] * 2 and accumulated.step == whole.step == 6
    assert_same_weights(small, big)


def test_divided_by_the_group_size_not_accumulate_steps_for_the_short_group():
    # Lightning divides the short group's losses by accumulate_steps too; here that would be 3/4 of the mean.
    x, y = toy_data(24, FEATURES, CLASSES, seed=2)
    torch.manual_seed(0)
    model = torch.nn.Linear(FEATURES, CLASSES)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    loop = TrainingLoop(TrainingEpochs((x, y), 8, shuffle=False), None, torch.optim.SGD(model.parameters(), lr=1.0),
                        include_default_callbacks=False)
    loop.fit(model, 1, device="cpu", accumulate_steps=4)  # one group of 3 batches
    reference = torch.nn.Linear(FEATURES, CLASSES)
    reference.load_state_dict(start)
    F.cross_entropy(reference(x), y).backward()  # the mean over all 24 samples
    torch.testing.assert_close(model.weight, start["weight"] - reference.weight.grad)


def test_data_without_len_accumulates_the_same():
    class NoLen:
        def __init__(self, x, y): self.epochs = TrainingEpochs((x, y), 8, seed=5)
        def __iter__(self): return iter(self.epochs)
    with_len, a = fit(88, 8, accumulate_steps=4)
    without, b = fit(88, 8, accumulate_steps=4, training=NoLen)
    assert_same_weights(with_len, without, rtol=0, atol=0)
    assert a.step == b.step == 6


def test_a_group_whose_step_is_cancelled_leaves_no_gradient_behind():
    class CancelFirstUpdate(Callback):
        def update_start(self, loop):
            if loop.step == 0 and loop.epoch_index == 0 and loop.batch_index == 3: raise CancelBatch()
    model, loop = fit(64, 8, epochs=1, accumulate_steps=4, callbacks=[CancelFirstUpdate()], momentum=0.0)
    assert loop.step == 1
    # the oracle: one plain step on the second group's 32 samples alone
    x, y = toy_data(64 + 40, FEATURES, CLASSES, seed=2)
    order = TrainingEpochs((x[:64], y[:64]), 8, seed=5).epoch_order(0)[32:64]
    torch.manual_seed(0)
    reference = torch.nn.Linear(FEATURES, CLASSES)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.3)
    F.cross_entropy(reference(x[order]), y[order]).backward()
    optimizer.step()
    assert_same_weights(model, reference)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_accumulate_steps_must_be_a_positive_whole_number(bad):
    with pytest.raises(ValueError, match="accumulate_steps"): fit(32, 8, accumulate_steps=bad)


# --- mixed precision ---------------------------------------------------------------------------------
class Dtypes(Callback):
    def __init__(self): self.seen = set()
    def batch_end(self, loop):
        self.seen.add((str(loop.phase), loop.last_step_output.dtype, loop.last_step_loss.dtype))


def test_bf16_mixed_runs_the_forward_pass_in_bfloat16_and_keeps_weights_and_metrics_exact():
    dtypes = Dtypes()
    model, loop = fit(64, 16, callbacks=[dtypes], precision="bf16-mixed")
    # outputs in bfloat16 (autocast), the loss in float32 (cross-entropy is on autocast's float32 list), both phases
    assert dtypes.seen == {("training", torch.bfloat16, torch.float32), ("validation", torch.bfloat16, torch.float32)}
    assert model.weight.dtype == torch.float32 and loop.scaler is None
    # the validation numbers are exact over the phase: sums of the very bf16 outputs, in float64
    x, y = toy_data(64 + 40, FEATURES, CLASSES, seed=2)
    total, correct = 0.0, 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for xb, yb in ValidationBatches((x[64:], y[64:]), 16):
            output = model(xb)
            total += F.cross_entropy(output, yb).double().item() * len(yb)
            correct += int((output.argmax(1) == yb).sum())
    assert loop.history[-1]["valid_loss"] == pytest.approx(total / 40, rel=1e-12)
    assert loop.history[-1]["valid_accuracy"] == correct / 40


def test_metrics_add_bfloat16_values_into_float64_and_int64_sums():
    metrics = make_metrics(["accuracy", "top5_accuracy", "mcc", "perplexity"])
    output = torch.randn(6, 7).bfloat16()
    target = torch.randint(0, 7, (6,))
    for m in metrics: m.update(output, target, torch.tensor(1.1).bfloat16())
    loss, accuracy, top5, mcc, perplexity = metrics
    assert loss.total.dtype == torch.float64 and loss.compute() == float(torch.tensor(1.1).bfloat16())
    assert accuracy.total.dtype == torch.int64 and mcc.matrix.dtype == torch.int64
    assert accuracy.compute() == float((output.float().argmax(1) == target).double().mean())
    assert math.isclose(perplexity.compute(), math.exp(float(torch.tensor(1.1).bfloat16())))


def test_float16_mixed_uses_a_grad_scaler_and_matches_float32_closely():
    model16, loop16 = fit(64, 16, precision="16-mixed")
    model32, loop32 = fit(64, 16)
    assert isinstance(loop16.scaler, torch.amp.GradScaler) and loop16.step == loop32.step == 8
    assert_same_weights(model16, model32, rtol=0, atol=2e-2)
    assert loop16.history[-1]["valid_loss"] == pytest.approx(loop32.history[-1]["valid_loss"], abs=2e-2)


def test_a_step_the_scaler_skips_is_not_counted():
    class Overflow(Callback):
        "Makes the gradients of the third batch infinite, as a float16 overflow would."
        def __init__(self): self.scales, self.weights = [], []
        def update_start(self, loop):
            if loop.batch_index == 2:
                self.before = loop.model.weight.detach().clone()
                for p in loop.model.parameters(): p.grad.fill_(math.inf)
        def batch_end(self, loop):
            if loop.phase != "training": return
            if loop.batch_index == 2: self.after = loop.model.weight.detach().clone()
            self.scales.append(loop.scaler.get_scale())
    overflow, steps = Overflow(), Steps()
    model, loop = fit(64, 16, epochs=1, callbacks=[overflow, steps], precision="16-mixed")
    assert [u[2] for u in steps.updates] == [0, 1, 2, 2]  # the skipped step left `step` where it was
    assert loop.step == 3
    assert torch.equal(overflow.before, overflow.after)  # and the weights too
    assert overflow.scales[2] == overflow.scales[1] / 2  # GradScaler backed off


@pytest.mark.parametrize("bad", ["16", "bf16", 32, "fp32", None])
def test_unknown_precisions_are_refused_with_the_valid_ones(bad):
    with pytest.raises(ValueError, match="'32', 'bf16-mixed', '16-mixed'"): fit(32, 8, precision=bad)


def test_a_precision_the_device_cannot_run_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.amp, "is_autocast_available", lambda device_type: False)
    with pytest.raises(ValueError, match="precision='32' there"): fit(32, 8, precision="bf16-mixed")


def test_accumulation_and_mixed_precision_together():
    small, accumulated = fit(96, 8, accumulate_steps=4, precision="bf16-mixed")
    big, whole = fit(96, 32, precision="bf16-mixed")
    assert accumulated.step == whole.step == 6
    assert_same_weights(small, big, rtol=0, atol=2e-2)


# --- compile -----------------------------------------------------------------------------------------
def test_compile_trains_the_original_model_object():
    if cxx_compiler() is None:
        print("skipping: torch.compile's CPU backend needs a C++ compiler and none is installed")
        pytest.skip("no C++ compiler for torch.compile on the CPU")
    torch._dynamo.reset()
    compiled, loop = fit(32, 16, epochs=1, validation=False, compile=True)
    plain, _ = fit(32, 16, epochs=1, validation=False)
    assert loop.model is compiled and type(compiled) is torch.nn.Linear  # the caller's object, trained in place
    assert_same_weights(compiled, plain, rtol=1e-5, atol=1e-6)
