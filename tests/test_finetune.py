"""Fine-tuning as fastai users know it: layer groups, freezing (normalisation layers stay trainable), the one-cycle
policy against torch's OneCycleLR over whole fits (SGD and Adam, rates and momenta), discriminative rates, fine_tune's
two stages with fastai's numbers, and run state: trainable flags restored from a checkpoint, and a fine_tune stopped by
Ctrl-C in its second stage that resumes bitwise."""
import math
import os
import signal
from collections import OrderedDict

import matplotlib

matplotlib.use("Agg")

import pytest
import torch
from torch import nn

from trainloop_nb.core import Callback
from trainloop_nb.data import TrainingEpochs, ValidationBatches
from trainloop_nb.loop import TrainingLoop
from trainloop_nb.callbacks.checkpoint import Checkpoint
from trainloop_nb.callbacks.schedule import LearningRateScheduler, OneCycle, OneCycleScheduler, plot_schedule
from trainloop_nb.designer import schedule_designer
from trainloop_nb.finetune import (TrainableFlags, fine_tune, fit_one_cycle, freeze, freeze_to, layer_groups,
                                   optimizer_for_groups, unfreeze)

BATCHES = 5  # per epoch


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(50, 6, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    return TrainingEpochs((x[:40], y[:40]), batch_size=8, seed=seed), ValidationBatches((x[40:], y[40:]), 5)


def mlp(seed=0):
    torch.manual_seed(seed)
    body = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
    return nn.Sequential(OrderedDict(body=body, head=nn.Linear(8, 2)))


def build(optimizer="adam", seed=0, callbacks=()):
    model = mlp(seed)
    opt = (torch.optim.Adam(model.parameters(), lr=1e-3) if optimizer == "adam"
           else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    training, validation = data(seed)
    loop = TrainingLoop(training, validation, opt, metrics=["accuracy"], callbacks=list(callbacks),
                        include_default_callbacks=False)
    return loop, model


class RecordHypers(Callback):
    "Each training step's rate and momentum of every group, read just before the optimizer uses them."
    def __init__(self): self.fits = []
    def fit_start(self, loop): self.fits.append([])
    def update_start(self, loop):
        groups = loop.optimizer.param_groups
        self.fits[-1].append([(g["lr"], g["betas"][0] if "betas" in g else g["momentum"]) for g in groups])


def torch_one_cycle(optimizer_class, peaks, total_steps, div, div_final, pct_start, moms):
    "What OneCycleLR sets at each of `total_steps` steps, per group: (rate, momentum)."
    params = [[torch.zeros(1, requires_grad=True)] for _ in peaks]
    opt = optimizer_class([{"params": p} for p in params], lr=1.0)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=list(peaks), total_steps=total_steps, pct_start=pct_start, anneal_strategy="cos",
        cycle_momentum=True, base_momentum=moms[1], max_momentum=moms[0], div_factor=div,
        final_div_factor=div_final / div, three_phase=False)
    seen = []
    for _ in range(total_steps):
        seen.append([(g["lr"], g["betas"][0] if "betas" in g else g["momentum"]) for g in opt.param_groups])
        opt.step()
        scheduler.step()
    return seen


def assert_close(ours, theirs):
    assert len(ours) == len(theirs)
    for step, (a, b) in enumerate(zip(ours, theirs)):
        for (lr_a, m_a), (lr_b, m_b) in zip(a, b, strict=True):
            assert math.isclose(lr_a, lr_b, rel_tol=1e-9, abs_tol=1e-15), (step, lr_a, lr_b)
            assert math.isclose(m_a, m_b, rel_tol=1e-9), (step, m_a, m_b)


# -- the one-cycle policy against torch's OneCycleLR ---------------------------------------------------------

@pytest.mark.parametrize("optimizer, lr_max, options", [
    ("sgd", 0.05, {}),  # 3 x 5 = 15 steps: the peak falls between two steps (0.25 * 15 - 1 = 2.75)
    ("adam", slice(1e-4, 1e-2), {"pct_start": 0.3, "div": 5.0}),  # fine_tune's second stage, two groups
    # fine_tune's first stage's pct_start; other momenta (OneCycleLR ends at moms[0], so moms[2] == moms[0] here)
    ("adam", 0.01, {"pct_start": 0.99, "moms": (0.9, 0.8, 0.9)}),
])
def test_one_cycle_rates_and_momenta_equal_torch_one_cycle_lr_over_a_fit(optimizer, lr_max, options):
    recorder = RecordHypers()
    loop, model = build(optimizer)
    fit_one_cycle(loop, model, 3, lr_max, device="cpu", callbacks=[recorder], **options)
    peaks = [1e-4, 1e-2] if isinstance(lr_max, slice) else [lr_max]
    full = {"div": 25.0, "div_final": 1e5, "pct_start": 0.25, "moms": (0.95, 0.85, 0.95), **options}
    optimizer_class = torch.optim.Adam if optimizer == "adam" else torch.optim.SGD
    expected = torch_one_cycle(optimizer_class, peaks, 3 * BATCHES, **full)
    assert_close(recorder.fits[0], expected)


def test_a_plain_rate_keeps_the_groups_ratio_and_everything_is_put_back_at_fit_end():
    model = mlp()
    opt = torch.optim.SGD([{"params": model.body.parameters(), "lr": 0.01},
                           {"params": model.head.parameters(), "lr": 0.1}], lr=0.1, momentum=0.9)
    recorder = RecordHypers()
    loop = TrainingLoop(data()[0], None, opt, include_default_callbacks=False)
    fit_one_cycle(loop, model, 2, 0.2, device="cpu", callbacks=[recorder])
    assert loop.optimizer is opt  # a plain rate: the optimizer is kept
    expected = torch_one_cycle(torch.optim.SGD, [0.2, 2.0], 2 * BATCHES, 25.0, 1e5, 0.25, (0.95, 0.85, 0.95))
    assert_close(recorder.fits[0], expected)
    assert [(g["lr"], g["momentum"]) for g in opt.param_groups] == [(0.01, 0.9), (0.1, 0.9)]


def test_one_cycle_refusals_say_what_to_do():
    loop, model = build()
    with pytest.raises(ValueError, match="pct_start"): OneCycle(0.1, pct_start=1.5)
    with pytest.raises(ValueError, match="lr_max must be a finite number > 0"): OneCycle(-1)
    with pytest.raises(ValueError, match="moms must be three momenta"): OneCycleScheduler(0.1, moms=(0.9, 0.8))
    adagrad = torch.optim.Adagrad(model.parameters(), lr=0.1)
    plain = TrainingLoop(data()[0], None, adagrad, include_default_callbacks=False)
    with pytest.raises(ValueError, match="moms=None"): fit_one_cycle(plain, model, 1, 0.1, device="cpu")
    fit_one_cycle(plain, model, 1, 0.1, moms=None, device="cpu")  # the rate alone
    with pytest.raises(ValueError, match="one rate per group"):
        loop.fit(model, 1, device="cpu", callbacks=[OneCycleScheduler([0.1, 0.2])])
    scheduled = TrainingLoop(data()[0], None, torch.optim.SGD(model.parameters(), lr=0.1),
                             callbacks=[LearningRateScheduler(OneCycle(0.1))], include_default_callbacks=False)
    with pytest.raises(ValueError, match="already has a schedule"): fit_one_cycle(scheduled, model, 1, 0.1)


def test_one_cycle_is_a_schedule_function_for_learning_rate_scheduler_and_plot_schedule():
    recorder = RecordHypers()
    loop, model = build("sgd")
    loop.fit(model, 2, device="cpu", callbacks=[LearningRateScheduler(OneCycle(0.05)), recorder])
    expected = torch_one_cycle(torch.optim.SGD, [0.05], 2 * BATCHES, 25.0, 1e5, 0.25, (0.95, 0.85, 0.95))
    assert all(math.isclose(a[0][0], b[0][0], rel_tol=1e-9) for a, b in zip(recorder.fits[0], expected, strict=True))
    assert all(step[0][1] == 0.9 for step in recorder.fits[0])  # the rate alone: momentum untouched
    fig = plot_schedule(OneCycle(0.05, pct_start=0.3), epochs=2, total_steps=20)
    rate_axis, momentum_axis = fig.axes
    momenta = next(line for line in momentum_axis.get_lines() if line.get_gid() == "momentum").get_ydata()
    assert max(rate_axis.get_lines()[0].get_ydata()) == 0.05 and min(momenta) == 0.85
    with pytest.raises(ValueError, match="total_steps"): plot_schedule(OneCycle(0.05))


def test_the_designer_offers_a_one_cycle_preset():
    designer = schedule_designer(epochs=4, batches_per_epoch=25, segments=OneCycle(0.01))
    rates = designer.schedule
    assert [s.shape.name for s in designer.segments] == ["cosine", "cosine"]
    assert rates[24] == 0.01 == max(rates) and math.isclose(rates[0], 0.01 / 25) and math.isclose(rates[99], 1e-7)
    designer = schedule_designer(epochs=4, batches_per_epoch=25)  # the default warm-up, peak 0.1
    designer.one_cycle_button.click()
    assert designer.error is None and designer.schedule[24] == 0.1 and len(designer.segments) == 2


# -- layer groups and freezing ---------------------------------------------------------------------------------

def test_layer_groups_by_default_and_by_splitter():
    model = mlp()
    assert [len(g) for g in layer_groups(model)] == [6, 2]
    splitter = lambda m: [m.body[:2], list(m.body[3:].parameters()), m.head]
    assert [len(g) for g in layer_groups(model, splitter)] == [4, 2, 2]
    tied = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 5))
    tied[1].weight = tied[0].weight
    assert [len(g) for g in layer_groups(tied)] == [1, 1]  # the shared weight in the first group only
    with pytest.raises(ValueError, match="left out 2 of the model's parameters"):
        layer_groups(model, lambda m: [m.body])
    with pytest.raises(ValueError, match="not the model's"):
        layer_groups(model, lambda m: [m.body, m.head, nn.Linear(1, 1)])
    with pytest.raises(TypeError, match="module or a list of parameters"): layer_groups(model, lambda m: [m.body, 3])


def test_freeze_keeps_normalisation_layers_trainable_and_counts_n_from_the_end():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 4), nn.GroupNorm(2, 4), nn.Linear(4, 2))
    trainable = lambda: [n for n, p in model.named_parameters() if p.requires_grad]
    freeze(model)
    assert trainable() == ["1.weight", "1.bias", "3.weight", "3.bias", "4.weight", "4.bias"]
    freeze_to(model, -3)  # the last three groups, and the LayerNorm
    assert trainable() == ["1.weight", "1.bias", "2.weight", "2.bias", "3.weight", "3.bias", "4.weight", "4.bias"]
    freeze_to(model, 1)
    assert trainable()[0] == "1.weight" and "0.weight" not in trainable()
    unfreeze(model)
    assert len(trainable()) == 10
    with pytest.raises(ValueError, match="from -5 to 5"): freeze_to(model, 6)


def test_a_frozen_group_does_not_change_in_a_fit_but_its_batch_norm_does():
    loop, model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    freeze(model)
    fit_one_cycle(loop, model, 2, 0.01, device="cpu")
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in ("body.0.weight", "body.0.bias", "body.3.weight"))
    assert not torch.equal(after["body.1.weight"], before["body.1.weight"])
    assert not torch.equal(after["head.weight"], before["head.weight"])


# -- discriminative rates ------------------------------------------------------------------------------------

def test_a_slice_rebuilds_the_optimizer_per_layer_group_keeping_class_settings_and_state():
    loop, model = build("sgd")
    loop.optimizer.param_groups[0]["weight_decay"] = 0.0  # as built: a default
    loop.fit(model, 1, device="cpu")  # momentum buffers now exist
    old = loop.optimizer
    buffers = {id(p): old.state[p]["momentum_buffer"].clone() for p in model.parameters()}
    recorder = RecordHypers()
    fit_one_cycle(loop, model, 1, slice(1e-3, 1e-1), device="cpu", callbacks=[recorder])
    new = loop.optimizer
    assert new is not old and type(new) is torch.optim.SGD and len(new.param_groups) == 2
    assert [g["lr"] for g in new.param_groups] == [1e-3, 1e-1]  # the peaks, put back at fit_end
    assert all(g["momentum"] == 0.9 for g in new.param_groups)  # found at fit_start, put back
    assert [len(g["params"]) for g in new.param_groups] == [6, 2]
    assert all(math.isclose(lrs[1][0] / lrs[0][0], 100) for lrs in recorder.fits[0])
    # the state was carried over: the first step of the new fit started from the old buffers
    fresh_loop, fresh_model = build("sgd")
    fresh_loop.fit(fresh_model, 1, device="cpu")
    fresh_loop.optimizer = optimizer_for_groups(fresh_loop.optimizer, layer_groups(fresh_model), [1e-3, 1e-1])
    assert all(torch.equal(fresh_loop.optimizer.state[p]["momentum_buffer"], buffers[id(q)])
               for p, q in zip(fresh_model.parameters(), model.parameters()))


# -- fine_tune ---------------------------------------------------------------------------------------------------

def test_fine_tune_follows_fastai_two_stages():
    recorder = RecordHypers()
    loop, model = build()
    head_before = model.head.weight.clone()
    body_before = model.body[0].weight.clone()
    frozen_in_stage = []
    class Flags(Callback):
        def fit_start(self, loop): frozen_in_stage.append(not model.body[0].weight.requires_grad)
    history = fine_tune(loop, model, 2, base_lr=0.02, callbacks=[recorder, Flags()], device="cpu")
    assert frozen_in_stage == [True, False] and all(p.requires_grad for p in model.parameters())
    assert history is loop.history and len(history) == 2  # the second stage's
    first, second = recorder.fits
    adam = torch.optim.Adam
    assert_close(first, torch_one_cycle(adam, [0.002, 0.02], BATCHES, 25.0, 1e5, 0.99, (0.95, 0.85, 0.95)))
    assert_close(second, torch_one_cycle(adam, [0.01 / 100, 0.01], 2 * BATCHES, 5.0, 1e5, 0.3, (0.95, 0.85, 0.95)))
    assert not torch.equal(model.head.weight, head_before) and not torch.equal(model.body[0].weight, body_before)
    assert [g["lr"] for g in loop.optimizer.param_groups] == [0.01 / 100, 0.01]
    with pytest.raises(ValueError, match="loop.resume"): fine_tune(loop, model, 1, resume_from="run/checkpoints")
    recorder.fits.clear()
    fine_tune(loop, model, 1, freeze_epochs=0, callbacks=[recorder], device="cpu")
    assert len(recorder.fits) == 1  # the second stage alone


class CtrlCOnce(Callback):
    "Ctrl-C once, at the update of step `at` of the fit in which every parameter is trainable (fine_tune's second)."
    def __init__(self, at): self.at, self.done = at, False
    def update_start(self, loop):
        if not self.done and loop.step == self.at and all(p.requires_grad for p in loop.model.parameters()):
            self.done = True
            os.kill(os.getpid(), signal.SIGINT)


def test_fine_tune_stopped_by_ctrl_c_in_its_second_stage_resumes_bitwise(ctrl_c_raises):
    loop, model = build()
    full_history = fine_tune(loop, model, 2, base_lr=0.02, device="cpu")
    full = {k: v.clone() for k, v in model.state_dict().items()}

    loop, model = build()
    with pytest.raises(KeyboardInterrupt):
        fine_tune(loop, model, 2, base_lr=0.02, device="cpu", callbacks=[CtrlCOnce(at=6)])
    assert loop.step == 7 and len(loop.history) == 1  # inside the second epoch of the second stage
    history = loop.resume()
    assert all(torch.equal(v, full[k]) for k, v in model.state_dict().items())
    strip = lambda h: [{k: v for k, v in r.items() if k != "time"} for r in h]
    assert strip(history) == strip(full_history)


def test_trainable_flags_come_back_from_a_checkpoint_into_a_fresh_model(tmp_path, ctrl_c_raises):
    "A frozen one-cycle fit stopped by Ctrl-C, resumed in a new model (all trainable) from its checkpoint: exact."
    def run(model_loop, callbacks=(), **options):
        loop, model = model_loop
        return fit_one_cycle(loop, model, 2, slice(1e-3, 1e-2), device="cpu", callbacks=list(callbacks), **options)
    full_loop, full_model = build()
    freeze(full_model)
    run((full_loop, full_model))

    class CtrlC(Callback):
        def update_start(self, loop):
            if loop.step == 6: os.kill(os.getpid(), signal.SIGINT)
    loop, model = build()
    freeze(model)
    with pytest.raises(KeyboardInterrupt): run((loop, model), [Checkpoint(tmp_path), CtrlC()])

    fresh_loop, fresh_model = build(seed=0)  # a new process would build it so: every parameter trainable
    assert all(p.requires_grad for p in fresh_model.parameters())
    run((fresh_loop, fresh_model), [Checkpoint(tmp_path)], resume_from=tmp_path)
    assert [n for n, p in fresh_model.named_parameters() if not p.requires_grad] == [
        "body.0.weight", "body.0.bias", "body.3.weight", "body.3.bias"]
    assert all(torch.equal(v, full_model.state_dict()[k]) for k, v in fresh_model.state_dict().items())
    assert [g["lr"] for g in fresh_loop.optimizer.param_groups] == [g["lr"] for g in full_loop.optimizer.param_groups]


def test_trainable_flags_state_refuses_another_model():
    flags = TrainableFlags()
    loop, model = build()
    flags.load_state_dict({"trainable": {"encoder.weight": False}})
    with pytest.raises(ValueError, match="encoder.weight"): loop.fit(model, 1, device="cpu", callbacks=[flags])


def test_fine_tune_with_a_checkpoint_says_before_training_how_to_run_the_stages(tmp_path):
    loop, model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="Checkpoint directory of its own"):
        fine_tune(loop, model, 1, callbacks=[Checkpoint(tmp_path)], device="cpu")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) and not list(tmp_path.iterdir())
