"""GradientClipping: the same clipping as torch's clip_grad_norm_, the norm kept on the device, no host reads,
and float16 gradients unscaled before they are clipped."""
import copy
from types import SimpleNamespace

import pytest
import torch

from host_reads import count_host_reads
from trainloop_nb.callbacks.clipping import GradientClipping
from trainloop_nb.core import Callback
from trainloop_nb.data import TrainingEpochs
from trainloop_nb.loop import TrainingLoop
from trainloop_nb.losses import mean_squared_error


def make_loop(callbacks, batches=4, lr=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16 * batches, 3, generator=g)
    y = 5 * x.sum(1, keepdim=True) + 3
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    loop = TrainingLoop(TrainingEpochs((x, y), batch_size=16, seed=seed), None,
                        torch.optim.SGD(model.parameters(), lr=lr), loss_func=mean_squared_error,
                        callbacks=callbacks, include_default_callbacks=False)
    return loop, model


class Oracle(Callback):
    "Before the clipping: copy the model with its gradients and clip the copy with torch itself."
    order = -10
    def __init__(self, max_norm, norm_type): self.max_norm, self.norm_type, self.checked = max_norm, norm_type, 0
    def update_start(self, loop):
        self.copy = copy.deepcopy(loop.model)
        for p, q in zip(loop.model.parameters(), self.copy.parameters()): q.grad = p.grad.clone()
        self.norm = torch.nn.utils.clip_grad_norm_(self.copy.parameters(), self.max_norm, self.norm_type)


class Compare(Callback):
    "After the clipping: the model's gradients and norm must be the oracle's."
    order = 10
    def __init__(self, oracle): self.oracle = oracle
    def update_start(self, loop):
        for p, q in zip(loop.model.parameters(), self.oracle.copy.parameters()):
            assert torch.equal(p.grad, q.grad)
        assert torch.equal(loop.last_grad_norm, self.oracle.norm)
        self.oracle.checked += 1


@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")])
@pytest.mark.parametrize("max_norm", [0.5, 1e6])  # clipping, and a bound never reached
def test_clips_exactly_as_clip_grad_norm_on_a_copy_with_the_same_gradients(norm_type, max_norm):
    oracle = Oracle(max_norm, norm_type)
    loop, model = make_loop([oracle, GradientClipping(max_norm, norm_type), Compare(oracle)])
    loop.fit(model, epochs=2, device="cpu")
    assert oracle.checked == 8  # every step was checked


@pytest.mark.parametrize("norm_type", [2.0, float("inf")])
def test_the_norm_is_the_norm_before_clipping_and_after_it_the_gradients_are_within_max_norm(norm_type):
    seen = []
    class Before(Callback):
        order = -10
        def update_start(self, loop):
            grads = torch.cat([p.grad.flatten() for p in loop.model.parameters()])
            seen.append([torch.linalg.vector_norm(grads, norm_type)])  # computed by hand, as the oracle
    class After(Callback):
        order = 10
        def update_start(self, loop):
            grads = torch.cat([p.grad.flatten() for p in loop.model.parameters()])
            seen[-1] += [loop.last_grad_norm.clone(), torch.linalg.vector_norm(grads, norm_type)]
    loop, model = make_loop([Before(), GradientClipping(1.0, norm_type), After()], lr=0.01)
    loop.fit(model, epochs=1, device="cpu")
    assert len(seen) == 4
    for by_hand, reported, after in seen:
        assert torch.allclose(reported, by_hand, rtol=1e-5)
        assert torch.allclose(after, torch.clamp(by_hand, max=1.0), rtol=1e-5)
    assert any(by_hand > 1.0 for by_hand, _, _ in seen)  # the test did clip


def test_the_norm_stays_on_the_device_and_is_reset_for_each_fit():
    norms = []
    loop, model = make_loop([GradientClipping(1.0), lambda loop, event: norms.append(loop.last_grad_norm)
                             if event == "fit_start" else None])
    loop.last_grad_norm = torch.tensor(123.0)
    loop.fit(model, epochs=1, device="cpu")
    assert norms == [None]  # nothing stale from before the fit
    assert isinstance(loop.last_grad_norm, torch.Tensor) and loop.last_grad_norm.dim() == 0
    assert loop.last_grad_norm.device == next(model.parameters()).device


def test_no_host_reads_per_batch():
    def reads(batches):
        loop, model = make_loop([GradientClipping(0.5)], batches=batches)
        with count_host_reads() as count:
            loop.fit(model, epochs=2, device="cpu")
        return count[0]
    assert reads(3) == reads(12)  # whatever the loop reads per phase, clipping adds nothing per batch


class FakeScaler:
    "Stands in for an enabled float16 GradScaler: 'unscaling' divides the gradients by its scale."
    def __init__(self, log, scale=1000.0, enabled=True): self.log, self.scale, self.enabled = log, scale, enabled
    def is_enabled(self): return self.enabled
    def unscale_(self, optimizer):
        self.log.append(("unscale", optimizer))
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None: p.grad.div_(self.scale)


def test_gradients_are_unscaled_before_they_are_clipped(monkeypatch):
    log = []
    original = torch.nn.utils.clip_grad_norm_
    def logged_clip(*args, **kwargs):
        log.append(("clip", None))
        return original(*args, **kwargs)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", logged_clip)
    model = torch.nn.Linear(3, 1)
    for p in model.parameters(): p.grad = torch.full_like(p, 1000.0)  # "scaled" gradients of true value 1
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loop = SimpleNamespace(model=model, optimizer=optimizer, scaler=FakeScaler(log))
    GradientClipping(max_norm=10.0).update_start(loop)
    assert [event for event, _ in log] == ["unscale", "clip"] and log[0][1] is optimizer
    assert torch.allclose(loop.last_grad_norm, torch.tensor(2.0))  # sqrt(4 ones): the unscaled norm
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())  # 2 < 10: not clipped


def test_a_disabled_or_absent_scaler_is_not_called():
    for scaler in (None, FakeScaler([], enabled=False)):
        model = torch.nn.Linear(3, 1)
        for p in model.parameters(): p.grad = torch.full_like(p, 1000.0)
        loop = SimpleNamespace(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), scaler=scaler)
        GradientClipping(max_norm=1e9).update_start(loop)
        assert torch.allclose(loop.last_grad_norm, torch.tensor(2000.0))
        assert scaler is None or scaler.log == []
    loop = SimpleNamespace(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))  # no attribute at all
    GradientClipping(max_norm=1e9).update_start(loop)


def test_with_a_real_grad_scaler_the_clipped_gradients_are_the_unscaled_ones():
    torch.manual_seed(0)
    model, reference = torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)
    reference.load_state_dict(model.state_dict())
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    loop = SimpleNamespace(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), scaler=scaler)
    scaler.scale(mean_squared_error(model(x), y)).backward()
    GradientClipping(max_norm=0.25).update_start(loop)
    mean_squared_error(reference(x), y).backward()
    expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.25)
    assert torch.allclose(loop.last_grad_norm, expected) and expected > 0.25
    assert all(torch.allclose(p.grad, q.grad) for p, q in zip(model.parameters(), reference.parameters()))
    scaler.step(loop.optimizer)  # would raise if unscale_ were called twice; steps with the clipped gradients
    scaler.update()


def test_parameters_without_gradients_are_left_alone():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    model[0].weight.grad = torch.full((2, 2), 3.0)
    loop = SimpleNamespace(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    GradientClipping(max_norm=1.0).update_start(loop)
    assert torch.allclose(loop.last_grad_norm, torch.tensor(6.0))
    assert torch.allclose(model[0].weight.grad, torch.full((2, 2), 0.5), rtol=1e-5)
    assert model[1].weight.grad is None and model[0].bias.grad is None


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_norm=0), "max_norm must be a positive number"),
    (dict(max_norm=-1.0), "max_norm must be a positive number"),
    (dict(max_norm="1"), "max_norm must be a positive number"),
    (dict(max_norm=float("nan")), "max_norm must be a positive number"),
    (dict(max_norm=float("inf")), "max_norm must be finite"),
    (dict(max_norm=1.0, norm_type=0), "norm_type must be a positive number"),
    (dict(max_norm=True), "max_norm must be a positive number"),
])
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message): GradientClipping(**kwargs)


def test_repr():
    assert repr(GradientClipping(1.0, float("inf"))) == "GradientClipping(max_norm=1, norm_type=inf)"
