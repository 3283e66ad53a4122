"""explain_nonfinite: the step it names is the first whose loss was not finite (checked against a hand replay), the
place it names is where the first nan or inf appeared, and the failed fit's model and optimizer are left as they were."""
import math
import warnings

import pytest
import torch

from trainloop_nb.callbacks.checkpoint import Checkpoint
from trainloop_nb.data import TrainingEpochs
from trainloop_nb.explain import explain_nonfinite
from trainloop_nb.loop import TrainingLoop
from trainloop_nb.losses import mean_squared_error, softmax_cross_entropy


class Exp(torch.nn.Module):
    "exp of its input: overflows to inf above 88 (float32)."
    def forward(self, x): return torch.exp(x)


class _ExplodingGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.where(x.abs() > 100, torch.tensor(1e39, dtype=grad.dtype), torch.tensor(1.0, dtype=grad.dtype))


class ExplodingGradient(torch.nn.Module):
    "The identity forward; backward, the gradient times 1e39 (inf) where the input is above 100."
    def forward(self, x): return _ExplodingGradient.apply(x)


def data(bad_sample: int, how: str, seed: int = 0):
    "64 samples of 4 features; the sample `bad_sample` spoiled as `how` says."
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 4, generator=g)
    y = (x[:, 0] > 0).long()
    if how == "nan": x[bad_sample, 1] = math.nan
    else: x[bad_sample] *= {"large": 1000.0, "huge": 1e20}[how]
    return x, y


def failed_fit(model, x, y, tmp_path, loss_func=softmax_cross_entropy, epochs=2, every_steps=3, lr=0.01, checkpoint=True):
    "A fit of `model` on (x, y) that stops with FloatingPointError; (loop, model)."
    callbacks = [Checkpoint(tmp_path / "checkpoints", every_steps=every_steps)] if checkpoint else []
    loop = TrainingLoop(TrainingEpochs((x, y), batch_size=8, seed=0), optimizer=torch.optim.SGD(model.parameters(), lr=lr,
                        momentum=0.9), loss_func=loss_func, callbacks=callbacks, include_default_callbacks=False)
    with warnings.catch_warnings(), pytest.raises(FloatingPointError):
        warnings.simplefilter("ignore")  # Checkpoint's "wrote nothing: not finite"
        loop.fit(model, epochs)
    return loop


def hand_replay(make_model, x, y, loss_func, epochs=2, lr=0.01):
    "(epoch, batch), 1-based, of the first non-finite loss of the same training written out in plain PyTorch."
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    data = TrainingEpochs((x, y), batch_size=8, seed=0)
    for epoch in range(epochs):
        for batch, (xb, yb) in enumerate(data):
            optimizer.zero_grad()
            loss = loss_func(model(xb), yb)
            if not torch.isfinite(loss): return epoch + 1, batch + 1
            loss.backward()
            optimizer.step()
    return None


def seeded(build):
    def make():
        torch.manual_seed(0)
        return build()
    return make


CASES = {  # name: (model maker, spoiled sample, how, loss, expected where, expected module)
    "forward": (seeded(lambda: torch.nn.Sequential(torch.nn.Linear(4, 8), Exp(), torch.nn.Linear(8, 2))),
                37, "large", softmax_cross_entropy, "forward", "1"),
    "input": (seeded(lambda: torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))),
              50, "nan", softmax_cross_entropy, "input", ""),
    "loss": (seeded(lambda: torch.nn.Sequential(torch.nn.Linear(4, 1))), 56, "huge", mean_squared_error, "loss", ""),
    "backward": (seeded(lambda: torch.nn.Sequential(torch.nn.Linear(4, 8), ExplodingGradient(), torch.nn.Linear(8, 2))),
                 25, "large", softmax_cross_entropy, "backward", "1"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_report_names_the_first_nonfinite_step_and_where_it_began(case, tmp_path):
    make_model, bad, how, loss_func, where, module = CASES[case]
    x, y = data(bad, how)
    if loss_func is mean_squared_error: y = x[:, :1].clone()
    loop = failed_fit(make_model(), x, y, tmp_path, loss_func)
    report = explain_nonfinite(loop)
    assert (report.epoch, report.batch) == hand_replay(make_model, x, y, loss_func)
    assert report.step == loop.exception.step
    assert (report.where, report.module) == (where, module)
    assert str(report).startswith(f"First non-finite loss: epoch {report.epoch}, batch {report.batch}")


def test_a_gradient_that_explodes_is_found_at_the_batch_before_the_first_nonfinite_loss(tmp_path):
    make_model, bad, how, loss_func, _, _ = CASES["backward"]
    x, y = data(bad, how)
    loop = failed_fit(make_model(), x, y, tmp_path, loss_func)
    report = explain_nonfinite(loop)
    # The exploding batch's own loss was finite; its step put inf into the weights, and the next batch's loss was not.
    assert (report.origin_epoch, report.origin_batch + 1) == (report.epoch, report.batch)
    assert "earlier" in str(report)


def test_input_statistics_are_those_of_the_batch(tmp_path):
    make_model, bad, how, loss_func, _, _ = CASES["input"]
    x, y = data(bad, how)
    loop = failed_fit(make_model(), x, y, tmp_path, loss_func)
    report = explain_nonfinite(loop)
    batch_x = list(TrainingEpochs((x, y), batch_size=8, seed=0))[report.batch - 1][0]  # epoch 1's order
    finite = batch_x[batch_x.isfinite()]
    assert report.input_stats == {"min": finite.min().item(), "max": finite.max().item(),
                                  "mean": pytest.approx(finite.double().mean().item()), "nan": 1.0, "inf": 0.0}


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    "Bitwise equal, nan where the other has nan (the failed fit's weights may hold some)."
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))


def test_the_failed_fits_model_optimizer_and_randomness_are_left_as_they_were(tmp_path):
    make_model, bad, how, loss_func, _, _ = CASES["forward"]
    x, y = data(bad, how)
    loop = failed_fit(make_model(), x, y, tmp_path, loss_func)
    weights = {k: v.clone() for k, v in loop.model.state_dict().items()}
    momentum = [loop.optimizer.state[p]["momentum_buffer"].clone() for p in loop.model.parameters()]
    rng = torch.get_rng_state()
    explain_nonfinite(loop)
    assert all(same(v, weights[k]) for k, v in loop.model.state_dict().items())
    assert all(same(loop.optimizer.state[p]["momentum_buffer"], m) for p, m in zip(loop.model.parameters(), momentum))
    assert torch.equal(torch.get_rng_state(), rng)
    assert isinstance(loop.exception, FloatingPointError)


def test_without_a_checkpoint_the_error_says_to_add_one(tmp_path):
    make_model, bad, how, loss_func, _, _ = CASES["input"]
    x, y = data(bad, how)
    loop = failed_fit(make_model(), x, y, tmp_path, loss_func, checkpoint=False)
    with pytest.raises(ValueError, match=r"Checkpoint\(every_steps=\.\.\.\)"): explain_nonfinite(loop)


def test_with_no_checkpoint_before_the_step_the_error_says_to_write_them_more_often(tmp_path):
    make_model, bad, how, loss_func, _, _ = CASES["input"]
    x, y = data(3, how)  # in the first batch of the run: no checkpoint can be older
    loop = failed_fit(make_model(), x, y, tmp_path, loss_func, every_steps=100)
    with pytest.raises(ValueError, match="no checkpoint written before"): explain_nonfinite(loop)


def test_a_fit_that_did_not_fail_on_a_nonfinite_loss_is_refused(tmp_path):
    x, y = data(0, "large")
    model = torch.nn.Linear(4, 2)
    loop = TrainingLoop([(x, y)], optimizer=torch.optim.SGD(model.parameters(), lr=0.01), include_default_callbacks=False)
    loop.fit(model, 1)
    with pytest.raises(RuntimeError, match="FloatingPointError"): explain_nonfinite(loop)
