"""A fit in the background: pause/resume only between batches, stop() and Ctrl-C end it like Ctrl-C does (bitwise
resumable), a steered learning rate is part of the run state, and wait() returns the history or raises the error."""
import signal

import pytest
import torch

from trainloop_nb.background import monitor, start_background
from trainloop_nb.callbacks.checkpoint import Checkpoint, list_checkpoints
from trainloop_nb.callbacks.schedule import LearningRateScheduler
from trainloop_nb.core import Callback
from trainloop_nb.data import TrainingEpochs
from trainloop_nb.loop import TrainingLoop


def toy(callbacks=(), batches=60, seed=0):
    "A loop over `batches` batches of 4 samples (dropout: the generators matter) and its model."
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batches * 4, 6, generator=g)
    y = (x[:, 0] > 0).long()
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Dropout(0.2), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    loop = TrainingLoop(TrainingEpochs((x, y), batch_size=4, seed=seed), optimizer=torch.optim.SGD(
        model.parameters(), lr=0.05, momentum=0.9), metrics=["accuracy"], callbacks=list(callbacks),
        include_default_callbacks=False)
    return loop, model


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


class NoBatchWhilePaused(Callback):
    "Records a batch event that happens while the test says the fit is paused."
    def __init__(self): self.paused, self.violations = False, []
    def batch_start(self, loop): self._check(loop, "batch_start")
    def batch_end(self, loop): self._check(loop, "batch_end")
    def _check(self, loop, event):
        if self.paused: self.violations.append((event, loop.step))


def test_no_batch_runs_while_paused_over_many_pause_resume_cycles():
    watch = NoBatchWhilePaused()
    loop, model = toy([watch], batches=200)
    run = start_background(loop, model, epochs=2)
    steps = []
    for _ in range(30):
        run.pause()
        if run.done: break
        watch.paused = True
        frozen = loop.step
        assert loop.step == frozen and not run.done
        steps.append(frozen)
        watch.paused = False
        run.resume()
    history = run.wait()
    assert watch.violations == []
    assert len(history) == 2 and len(steps) >= 2 and steps == sorted(steps)


def test_stop_then_resume_gives_the_uninterrupted_weights_bitwise():
    reference_loop, reference_model = toy()
    reference_loop.fit(reference_model, 2)
    loop, model = toy()
    run = start_background(loop, model, epochs=2)
    run.pause()
    run.stop()
    history = run.wait()  # returns normally: a stop is not an error
    assert isinstance(loop.exception, KeyboardInterrupt) and history == loop.history and 0 < loop.step < 30
    loop.resume()
    assert same(weights(model), weights(reference_model))


def test_ctrl_c_while_a_background_fit_runs_stops_it_like_stop(ctrl_c_raises):
    reference_loop, reference_model = toy()
    reference_loop.fit(reference_model, 1)
    loop, model = toy()
    run = start_background(loop, model, epochs=1)
    run.pause()
    signal.raise_signal(signal.SIGINT)  # delivered to this, the main thread, while the fit's thread waits paused
    history = run.wait()
    assert run.done and isinstance(loop.exception, KeyboardInterrupt) and history == loop.history
    loop.resume()
    assert same(weights(model), weights(reference_model))
    with pytest.raises(KeyboardInterrupt): signal.raise_signal(signal.SIGINT)  # no fit left: Ctrl-C as before


class RateRecorder(Callback):
    "The first group's learning rate at each optimizer step."
    def __init__(self): self.rates = []
    def update_start(self, loop): self.rates.append(float(loop.optimizer.param_groups[0]["lr"]))


@pytest.mark.parametrize("scheduled", [False, True])
def test_a_steered_learning_rate_resumes_bitwise_from_a_checkpoint_taken_after_it(tmp_path, scheduled):
    schedule = lambda: [LearningRateScheduler(lambda total: [0.05 * (1 - i / total) for i in range(total)])]
    recorder = RateRecorder()
    extra = schedule() if scheduled else []
    loop, model = toy(extra + [recorder, Checkpoint(tmp_path / "a", every_steps=1, keep_last=None)])
    run = start_background(loop, model, epochs=2)
    run.pause()
    changed_at = loop.step  # the change applies from the next step on
    run.set_learning_rate(0.01)
    run.resume()
    run.wait()
    after = recorder.rates[changed_at]
    assert after == pytest.approx(0.01)
    if scheduled:  # from then on the schedule keeps its shape, scaled by the factor that made its rate 0.01
        factor = 0.01 / (0.05 * (1 - changed_at / 120))
        assert recorder.rates[-1] == pytest.approx(factor * 0.05 * (1 - 119 / 120))
    else: assert recorder.rates[changed_at:] == [0.01] * (len(recorder.rates) - changed_at)
    later = [p for p in list_checkpoints(tmp_path / "a") if int(p.stem.split("-")[1]) == changed_at + 3][0]
    loop2, model2 = toy((schedule() if scheduled else []) + [Checkpoint(tmp_path / "b", every_steps=1)])
    start_background(loop2, model2, epochs=2, resume_from=later).wait()
    assert same(weights(model2), weights(model))


class RateAt(Callback):
    "The oracle: in a fit in front, every group's rate scaled so the first's is `rate` as training step `step` + 1 starts."
    def __init__(self, step, rate): self.at, self.rate = step, rate
    def batch_start(self, loop):
        if loop.phase == "training" and loop.step == self.at:
            change = self.rate / loop.optimizer.param_groups[0]["lr"]
            for group in loop.optimizer.param_groups: group["lr"] *= change


def test_a_rate_set_while_paused_and_then_stopped_is_kept_by_the_resume():
    "Paused wherever the pause lands, steered, stopped, resumed in front: the weights of a fit steered at that step."
    loop, model = toy()
    run = start_background(loop, model, epochs=1)
    run.pause()
    paused_at = loop.step  # the loop waits between batches: no step can be made until resume() or stop()
    run.set_learning_rate(0.02)
    run.stop()
    run.wait()
    assert loop.step == paused_at  # stopped where it waited
    loop.resume()  # the requested rate is applied as the next training batch starts, in this fit
    reference_loop, reference_model = toy([RateAt(paused_at, 0.02)])
    reference_loop.fit(reference_model, 1)
    assert same(weights(model), weights(reference_model))


class FailsAt(Callback):
    def batch_end(self, loop):
        if loop.step == 5: raise ValueError("broken at step 5")


def test_wait_raises_the_fits_error():
    loop, model = toy([FailsAt()])
    run = start_background(loop, model, epochs=1)
    with pytest.raises(ValueError, match="broken at step 5"): run.wait()
    assert run.done and loop.step == 5


def test_wait_with_a_timeout_on_a_paused_fit_raises_timeout_error_and_the_fit_goes_on():
    loop, model = toy()
    run = start_background(loop, model, epochs=1)
    run.pause()
    with pytest.raises(TimeoutError, match="still running"): run.wait(timeout=0.01)
    run.resume()
    assert len(run.wait()) == 1


def test_monitor_shows_the_step_counter_and_the_end_of_the_background_fit():
    loop, model = toy()
    run = start_background(loop, model, epochs=1)
    bars = monitor(loop)
    run.wait()
    assert f"step {loop.step}" in bars.value and "finished" in bars.value and bars is monitor(loop)
    loop.fit(model, 1)
    with pytest.raises(RuntimeError, match="background"): monitor(loop)


def test_a_bad_learning_rate_is_refused():
    loop, model = toy()
    run = start_background(loop, model, epochs=1)
    with pytest.raises(ValueError, match="positive number"): run.set_learning_rate(-1)
    run.wait()
    with pytest.raises(RuntimeError, match="has ended"): run.set_learning_rate(0.1)
