"""The learning-rate range test: rates, early stop, suggestion, and everything left exactly as it was."""
import copy
import math

import matplotlib
import numpy as np
import pytest
import torch

from trainloop_nb.callbacks.lr_finder import (LRFinderResult, lr_find, range_test_rates, smooth_losses,
                                              steepest_index, valley_index)
from trainloop_nb.core import Callback
from trainloop_nb.data import Digits, TrainingEpochs
from trainloop_nb.loop import TrainingLoop
from trainloop_nb.losses import mean_squared_error
from trainloop_nb.models import LeNet


@pytest.fixture(autouse=True)
def one_thread():
    # The tests are small; one thread keeps them quick on a busy machine (and numerics do not depend on it here).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def regression(samples=256, batch_size=32, seed=0, optimizer="sgd", dropout=False):
    "y = 2x + 1 by a small model; SGD on it diverges once the rate passes about 1."
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(samples, 1, generator=g) * 2 - 1
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(1, 8), torch.nn.Tanh()] + ([torch.nn.Dropout(0.2)] if dropout else []) + [torch.nn.Linear(8, 1)]
    model = torch.nn.Sequential(*layers)
    opt = (torch.optim.Adam(model.parameters(), lr=1e-3) if optimizer == "adam"
           else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    data = TrainingEpochs((x, 2 * x + 1), batch_size=batch_size, seed=seed)
    loop = TrainingLoop(data, None, opt, loss_func=mean_squared_error, include_default_callbacks=False)
    return loop, model, data


def everything(model, optimizer, data):
    "All that lr_find must leave as it was, as comparable copies."
    return dict(
        tensors={k: v.detach().clone() for k, v in model.state_dict().items()},
        grads={k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()},
        optimizer=copy.deepcopy(optimizer.state_dict()),
        epoch=data.epoch, modes=[m.training for m in model.modules()], rng=torch.get_rng_state())


def assert_same(before, after):
    assert before["tensors"].keys() == after["tensors"].keys()
    for k, v in before["tensors"].items():
        assert v.dtype == after["tensors"][k].dtype and v.device == after["tensors"][k].device
        assert torch.equal(v, after["tensors"][k]), k
    for k, g in before["grads"].items():
        assert (g is None) == (after["grads"][k] is None) and (g is None or torch.equal(g, after["grads"][k])), k
    assert_equal_state(before["optimizer"], after["optimizer"])
    assert before["epoch"] == after["epoch"] and before["modes"] == after["modes"]
    assert torch.equal(before["rng"], after["rng"])


def assert_equal_state(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a: assert_equal_state(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b): assert_equal_state(x, y)
    else: assert a == b


def test_weights_gradients_adam_state_rates_epoch_and_random_state_are_restored_bit_for_bit():
    loop, model, data = regression(optimizer="adam")
    loop.fit(model, epochs=2, device="cpu")  # Adam moments and step counts exist now
    model.eval()  # a mode that the test's fit would change
    loss = mean_squared_error(model(torch.ones(4, 1)), torch.zeros(4, 1))
    loss.backward()  # leftover gradients, which must survive too
    params, groups, state_keys = list(model.parameters()), loop.optimizer.param_groups, list(loop.optimizer.state)
    first_group = groups[0]
    before = everything(model, loop.optimizer, data)
    assert before["optimizer"]["state"] and data.epoch == 2
    result = lr_find(loop, model, device="cpu")
    assert len(result.rates) > 10  # it did train
    assert_same(before, everything(model, loop.optimizer, data))
    # the same objects, not just equal values: the optimizer and the user hold references to them
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert loop.optimizer.param_groups is groups and loop.optimizer.param_groups[0] is first_group
    assert all(p is q for p, q in zip(loop.optimizer.state, state_keys))
    assert loop.learning_rate == 1e-3


def test_a_fit_after_lr_find_is_the_fit_without_it():
    # Dropout draws from torch's random state and TrainingEpochs serves epochs by number: both are put back.
    runs = []
    for find_first in (False, True):
        loop, model, data = regression(optimizer="adam", dropout=True)
        if find_first: lr_find(loop, model, num_steps=30, device="cpu")
        loop.fit(model, epochs=2, device="cpu")
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_a_fit_after_lr_find_draws_the_same_random_numbers():
    loop, model, data = regression(dropout=True)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    lr_find(loop, model, num_steps=20, device="cpu")
    assert torch.equal(torch.rand(3), expected)


def test_restored_after_an_error_in_the_test():
    class Boom(Callback):
        def batch_end(self, loop):
            if loop.step == 5: raise RuntimeError("boom")
    loop, model, data = regression(optimizer="adam")
    loop.fit(model, epochs=1, device="cpu")
    before = everything(model, loop.optimizer, data)
    with pytest.raises(RuntimeError, match="boom"):
        lr_find(loop, model, device="cpu", callbacks=[Boom()])
    assert_same(before, everything(model, loop.optimizer, data))


def test_rates_grow_exponentially_from_start_to_end_and_are_the_ones_applied():
    class Seen(Callback):
        def fit_start(self, loop): self.rates = []
        def update_start(self, loop): self.rates.append(loop.learning_rate)
    loop, model, _ = regression()
    seen = Seen()
    result = lr_find(loop, model, start_lr=1e-6, end_lr=1e-2, num_steps=40, device="cpu", callbacks=[seen])
    assert not result.diverged and len(result.rates) == len(result.losses) == 40 == result.num_steps
    assert result.rates[0] == 1e-6 and result.rates[-1] == 1e-2
    assert np.allclose(np.array(result.rates[1:]) / np.array(result.rates[:-1]), 1e4 ** (1 / 39), rtol=1e-12)
    assert np.allclose(result.rates, np.geomspace(1e-6, 1e-2, 40), rtol=1e-12)  # numpy as the oracle
    assert seen.rates == result.rates  # the rate of each step is the one the optimizer used


def test_several_parameter_groups_keep_their_ratio_and_tensor_rates_are_filled_in_place():
    loop, model, _ = regression()
    first, second = model[0], model[2]
    rate = torch.tensor(0.1)
    opt = torch.optim.SGD([{"params": first.parameters()}, {"params": second.parameters(), "lr": 0.01}], lr=rate)
    loop.optimizer = opt
    seen = []
    def probe(loop, event):
        if event == "update_start": seen.append([float(g["lr"]) for g in loop.optimizer.param_groups])
    lr_find(loop, model, start_lr=1e-5, end_lr=1e-3, num_steps=10, device="cpu", callbacks=[probe])
    assert all(math.isclose(b, a / 10, rel_tol=1e-6) for a, b in seen) and math.isclose(seen[-1][0], 1e-3, rel_tol=1e-6)
    assert opt.param_groups[0]["lr"] is rate and float(rate) == pytest.approx(0.1)  # put back, the same tensor
    assert opt.param_groups[1]["lr"] == 0.01


def test_stops_early_when_the_smoothed_loss_diverges():
    loop, model, _ = regression()
    result = lr_find(loop, model, start_lr=1e-4, end_lr=100, num_steps=100, device="cpu")
    assert result.diverged and 10 < len(result.rates) < 100
    assert result.smoothed_losses[-1] > 4 * min(result.smoothed_losses)
    assert all(s <= 4 * min(result.smoothed_losses[:i + 1]) for i, s in enumerate(result.smoothed_losses[:-1]))
    assert result.rates[-1] > 0.5  # SGD with momentum on this problem is stable below about 0.5
    assert "stopped early" in repr(result)


def test_stops_at_a_loss_that_is_not_finite():
    calls = [0]
    def loss_func(output, target):
        calls[0] += 1
        loss = mean_squared_error(output, target)
        return loss * float("nan") if calls[0] == 7 else loss
    loop, model, _ = regression()
    loop.loss_func = loss_func
    result = lr_find(loop, model, start_lr=1e-6, end_lr=1e-3, num_steps=50, device="cpu")
    assert result.diverged and len(result.losses) == 7 and math.isnan(result.losses[-1])
    assert result.suggestion in result.rates[:6]  # chosen among the finite ones


def test_the_divergence_factor_is_configurable():
    loop, model, _ = regression()
    loose = lr_find(loop, model, start_lr=1e-4, end_lr=100, device="cpu", divergence=100.0)
    strict = lr_find(loop, model, start_lr=1e-4, end_lr=100, device="cpu", divergence=1.5)
    assert len(strict.rates) < len(loose.rates)


@pytest.mark.parametrize("setup", ["sgd", "adam", "diverging", "short"])
def test_the_suggestion_is_one_of_the_rates(setup):
    loop, model, _ = regression(optimizer="adam" if setup == "adam" else "sgd")
    kwargs = dict(start_lr=1e-4, end_lr=100) if setup == "diverging" else dict(num_steps=6) if setup == "short" else {}
    result = lr_find(loop, model, device="cpu", **kwargs)
    assert result.suggestion in result.rates and result.steepest in result.rates
    assert isinstance(result, LRFinderResult) and f"{result.suggestion:.3g}" in repr(result)


def test_the_digits_demo_model_gets_a_sensible_suggestion():
    # LeNet on the digits with Adam trains well at 1e-3 to 3e-3 (the demo uses 3e-3); 1e-5 or 0.1 would not.
    torch.manual_seed(0)
    data = Digits(batch_size=64, seed=0)
    model = LeNet(in_channels=1, num_classes=10, image_size=8)
    loop = TrainingLoop(data.training, data.validation, torch.optim.Adam(model.parameters(), lr=3e-3),
                        include_default_callbacks=False)
    result = lr_find(loop, model, device="cpu")
    assert 3e-4 <= result.suggestion <= 1e-2, result
    assert data.training.epoch == 0


def test_valley_matches_fastais_reference_implementation():
    def fastai_valley(losses):  # fastai/callback/schedule.py, `valley`, as published (index part)
        n = len(losses)
        max_start, max_end = 0, 0
        lds = [1] * n
        for i in range(1, n):
            for j in range(0, i):
                if (losses[i] < losses[j]) and (lds[i] < lds[j] + 1): lds[i] = lds[j] + 1
                if lds[max_end] < lds[i]:
                    max_end = i
                    max_start = max_end - lds[max_end]
        sections = (max_end - max_start) / 3
        return max_start + int(sections) + int(sections / 2)
    rng = np.random.default_rng(0)
    for n in (3, 10, 57, 100):
        for _ in range(20):
            losses = (np.cumsum(rng.normal(size=n)) + rng.normal(size=n)).tolist()
            assert valley_index(losses) == min(max(fastai_valley(losses), 0), n - 1)  # fastai can give -1


def test_steepest_index_is_the_most_negative_slope_against_log_rate():
    rates = range_test_rates(1e-3, 1.0, 4)  # log-spaced: slopes compare like plain differences
    assert steepest_index(rates, [3.0, 2.9, 1.0, 0.9]) in (1, 2)
    assert steepest_index(rates, [1.0, 1.0, 1.0, 0.0]) == 3


def test_smoothing_is_a_bias_corrected_moving_average():
    losses = [3.0, 1.0, 2.0, 5.0]
    beta, average, expected = 0.9, 0.0, []
    for i, loss in enumerate(losses, 1):
        average = beta * average + (1 - beta) * loss
        expected.append(average / (1 - beta ** i))
    assert np.allclose(smooth_losses(losses, beta), expected)
    loop, model, _ = regression()
    result = lr_find(loop, model, num_steps=20, device="cpu")
    assert np.allclose(result.smoothed_losses, smooth_losses(result.losses, 0.98), rtol=1e-12)


def test_data_without_a_length_runs_until_num_steps():
    loop, model, data = regression()
    class NoLength:
        def __iter__(self): return iter(data)
    loop.training = NoLength()
    result = lr_find(loop, model, start_lr=1e-6, end_lr=1e-3, num_steps=20, device="cpu")
    assert len(result.rates) == 20  # 2.5 epochs of 8 batches: the fit ran epochs until the test ended it


@pytest.mark.parametrize("kwargs, message", [
    (dict(start_lr=0), "start_lr must be a positive finite number"),
    (dict(start_lr=-1e-3), "start_lr must be a positive finite number"),
    (dict(end_lr=float("inf")), "end_lr must be a positive finite number"),
    (dict(start_lr="1e-3"), "start_lr must be a positive finite number"),
    (dict(start_lr=1.0, end_lr=0.1), r"end_lr \(0.1\) must be larger than start_lr \(1\)"),
    (dict(num_steps=1), "num_steps must be a whole number of at least 5"),
    (dict(num_steps=50.0), "num_steps must be a whole number of at least 5"),
    (dict(smoothing=1.0), r"smoothing .* in \[0, 1\)"),
    (dict(divergence=0.5), "divergence must be a number above 1"),
])
def test_bad_arguments_give_clear_errors_before_anything_runs(kwargs, message):
    loop, model, data = regression()
    before = everything(model, loop.optimizer, data)
    with pytest.raises(ValueError, match=message): lr_find(loop, model, **kwargs)
    assert_same(before, everything(model, loop.optimizer, data))


def test_a_model_or_loop_of_the_wrong_kind_is_refused():
    loop, model, _ = regression()
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"): lr_find(loop, "model")
    with pytest.raises(TypeError, match="lr_find needs a TrainingLoop"): lr_find(object(), model)
    other = torch.nn.Linear(1, 1)
    with pytest.raises(ValueError, match="optimizer holds none of this model's parameters"):
        lr_find(loop, other, device="cpu")


def test_plot_looks_like_plot_schedule_and_marks_the_suggestion():
    import matplotlib.pyplot as plt
    loop, model, _ = regression()
    result = lr_find(loop, model, start_lr=1e-4, end_lr=100, device="cpu")
    open_before = plt.get_fignums()
    fig = result.plot()
    assert plt.get_fignums() == open_before  # closed in pyplot: shown once in Jupyter, no window in scripts
    assert isinstance(fig, matplotlib.figure.Figure) and tuple(fig.get_size_inches()) == (7, 3)
    assert fig.get_layout_engine().__class__.__name__ == "ConstrainedLayoutEngine"
    ax = fig.axes[0]
    lines = {l.get_gid(): l for l in ax.get_lines()}
    assert set(lines) == {"loss", "smoothed", "suggestion"} and ax.get_xscale() == "log"
    assert list(lines["suggestion"].get_xdata()) == [result.suggestion]
    assert list(lines["smoothed"].get_ydata()) == result.smoothed_losses
    assert "stopped early" in ax.get_title()


def test_plot_into_given_axes_and_to_a_file(tmp_path):
    import matplotlib.figure
    loop, model, _ = regression()
    result = lr_find(loop, model, num_steps=20, device="cpu")
    fig = matplotlib.figure.Figure()
    ax = fig.add_subplot()
    assert result.plot(ax=ax) is fig
    result.plot(path=tmp_path / "sub" / "lr.png")
    assert (tmp_path / "sub" / "lr.png").stat().st_size > 1000


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_model_on_the_cpu_comes_back_to_the_cpu_after_a_test_on_cuda():
    loop, model, data = regression(optimizer="adam")
    loop.fit(model, epochs=1, device="cpu")
    before = everything(model, loop.optimizer, data)
    result = lr_find(loop, model, device="cuda")
    assert len(result.rates) > 10
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(v.device.type == "cpu" for s in loop.optimizer.state.values() for v in s.values())
    assert_same(before, everything(model, loop.optimizer, data))


def test_the_loop_method_is_the_function():
    loop, model, _ = regression(seed=3)
    by_method = loop.lr_find(model, num_steps=20, device="cpu")
    loop2, model2, _ = regression(seed=3)
    by_function = lr_find(loop2, model2, num_steps=20, device="cpu")
    assert by_method.rates == by_function.rates and by_method.losses == by_function.losses
    assert by_method.suggestion == by_function.suggestion


@pytest.mark.parametrize("accumulate", [4, 3])  # 8 batches an epoch: groups of 4 and 4, or of 3, 3 and a short 2
def test_with_accumulation_one_point_per_optimizer_step_at_the_rate_it_used(accumulate):
    loop, model, _ = regression()
    batch_losses, used, ends = [], [], []  # every batch's loss; each optimizer step's rate, and where its batches end
    def loss_func(output, target):
        loss = mean_squared_error(output, target)
        batch_losses.append(float(loss.detach()))
        return loss
    def step_taken(optimizer, args, kwargs):
        used.append(optimizer.param_groups[0]["lr"])
        ends.append(len(batch_losses))
    loop.loss_func = loss_func
    hook = loop.optimizer.register_step_pre_hook(step_taken)
    try: result = lr_find(loop, model, start_lr=1e-3, end_lr=0.3, num_steps=12, device="cpu",
                          accumulate_steps=accumulate)
    finally: hook.remove()
    assert not result.diverged and len(result.rates) == len(result.losses) == len(used) == 12 == result.num_steps
    assert result.rates == used and result.rates == range_test_rates(1e-3, 0.3, 12)
    groups = [batch_losses[a:b] for a, b in zip([0] + ends[:-1], ends)]
    assert [len(g) for g in groups[:3]] == ([4, 4, 4] if accumulate == 4 else [3, 3, 2])  # a short group steps too
    assert result.losses == pytest.approx([sum(g) / len(g) for g in groups], rel=1e-12)
    assert result.suggestion in result.rates


def test_a_first_group_at_rate_zero_is_refused_as_the_scheduler_refuses_it():
    loop, model, data = regression()
    loop.optimizer = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.0},
                                      {"params": model[2].parameters(), "lr": 0.01}], lr=0.1)
    before = everything(model, loop.optimizer, data)
    with pytest.raises(ValueError, match="first parameter group has learning rate 0 .* ratio to it is undefined; "
                                         "give the first group a non-zero rate"):
        lr_find(loop, model, device="cpu")
    assert_same(before, everything(model, loop.optimizer, data))


def test_a_loss_that_diverges_from_the_first_step_gives_no_suggestion_and_says_why():
    loop, model, _ = regression()
    with pytest.warns(UserWarning, match="the loss never decreased: it diverged from the first step.*smaller start_lr"):
        result = lr_find(loop, model, start_lr=30.0, end_lr=1000.0, device="cpu")
    assert result.diverged and len(result.rates) < 10
    assert result.suggestion is None and result.steepest is None
    assert "never decreased" in result.reason and "diverged from the first step" in result.reason
    assert "no suggestion" in repr(result) and result.reason in repr(result) and str(result) == repr(result)
    ax = result.plot().axes[0]
    assert {l.get_gid() for l in ax.get_lines()} == {"loss", "smoothed"}  # no point marked
    assert any("diverged from the first step" in t.get_text().replace("\n", " ") for t in ax.texts)


def test_a_loss_that_is_nan_from_the_first_step_gives_no_suggestion_and_says_why():
    loop, model, _ = regression()
    loop.loss_func = lambda output, target: mean_squared_error(output, target) * float("nan")
    with pytest.warns(UserWarning, match="the loss never decreased: it was nan from step 1, before the first update"):
        result = lr_find(loop, model, device="cpu")
    assert result.diverged and len(result.rates) == 1 and math.isnan(result.losses[0])
    assert result.suggestion is None and result.steepest is None and "was nan from step 1" in result.reason
    assert result.reason in repr(result)
    ax = result.plot().axes[0]
    assert "suggestion" not in {l.get_gid() for l in ax.get_lines()}
    assert any("was nan from step 1" in t.get_text().replace("\n", " ") for t in ax.texts)


def test_a_normal_run_has_a_suggestion_and_no_warning(recwarn):
    loop, model, _ = regression()
    result = lr_find(loop, model, device="cpu")
    assert result.suggestion in result.rates and result.reason is None and "no suggestion" not in repr(result)
    assert not [w for w in recwarn if "suggestion" in str(w.message)]
