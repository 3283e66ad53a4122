"""EMA: the averages against a hand-written EMA and torch's AveragedModel, validation on them, the model at fit_end and
after an error, no host read, and runs stopped at every event resumed bitwise (from a checkpoint and in memory)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from host_reads import count_host_reads
from trainloop_nb.callbacks.checkpoint import Checkpoint
from trainloop_nb.callbacks.ema import EMA
from trainloop_nb.core import Callback, Event
from trainloop_nb.data import TrainingEpochs, ValidationBatches
from trainloop_nb.loop import TrainingLoop
from toy_runs import InterruptAt as RaiseAt

# Resumed fits below leave the Checkpoint out or keep it; the warning that its state goes unused is not ours.
pytestmark = pytest.mark.filterwarnings("ignore:.*holds the state of a callback Checkpoint:UserWarning")


def make_loop(callbacks, batches=4, optimizer="sgd", dropout=0.0, batchnorm=True, seed=0):
    "A small classifier with BatchNorm (averaged buffers) and optional dropout (random draws to replay on resume)."
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16 * batches + 10, 5, generator=g)
    y = (x[:, 0] - x[:, 1] > 0).long()
    torch.manual_seed(seed)
    norm = torch.nn.BatchNorm1d(12) if batchnorm else torch.nn.Identity()
    model = torch.nn.Sequential(torch.nn.Linear(5, 12), norm, torch.nn.ReLU(), torch.nn.Dropout(dropout), torch.nn.Linear(12, 2))
    opt = (torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9) if optimizer == "sgd"
           else torch.optim.Adam(model.parameters(), lr=0.05))
    loop = TrainingLoop(TrainingEpochs((x[:16 * batches], y[:16 * batches]), batch_size=16, seed=3),
                        ValidationBatches((x[16 * batches:], y[16 * batches:]), 5), opt, metrics=["accuracy"],
                        callbacks=callbacks, include_default_callbacks=False)
    return loop, model


def floating(state: dict) -> dict:
    return {k: v.detach().clone() for k, v in state.items() if v.is_floating_point()}


class StepWeights(Callback):
    "The model's floating-point weights after every optimizer step, by step (before EMA's batch_end: order 0 < 60)."
    def fit_start(self, loop): self.seen, self.after = loop.step, {}
    def batch_end(self, loop):
        if loop.step != self.seen:
            self.seen = loop.step
            self.after[loop.step] = floating(loop.model.state_dict())


def hand_ema(after: dict, decay: float, every_steps: int, upto: int) -> dict:
    "The average written out: the first update copies the weights, later ones average them in."
    average = None
    for step in range(1, upto + 1):
        if step % every_steps: continue
        weights = after[step]
        average = dict(weights) if average is None else {k: decay * average[k] + (1 - decay) * w for k, w in weights.items()}
    return average


def assert_close_state(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for k in expected: torch.testing.assert_close(actual[k], expected[k], msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("every_steps,accumulate_steps", [(1, 1), (3, 1), (1, 2)])
def test_the_model_ends_with_a_hand_written_ema_of_the_run(every_steps, accumulate_steps):
    weights, ema = StepWeights(), EMA(decay=0.8, every_steps=every_steps)
    loop, model = make_loop([weights, ema], batches=5)
    loop.fit(model, epochs=3, device="cpu", accumulate_steps=accumulate_steps)
    assert loop.step == 3 * -(-5 // accumulate_steps)  # an epoch's short last group steps too
    assert ema.updates == loop.step // every_steps
    assert_close_state(floating(model.state_dict()), hand_ema(weights.after, 0.8, every_steps, loop.step))


def test_the_averages_are_those_of_torch_averaged_model():
    class Oracle(Callback):
        def fit_start(self, loop):
            self.seen, self.model = loop.step, AveragedModel(loop.model, multi_avg_fn=get_ema_multi_avg_fn(0.9),
                                                             use_buffers=True)
        def batch_end(self, loop):
            if loop.step != self.seen:
                self.seen = loop.step
                self.model.update_parameters(loop.model)
    oracle = Oracle()
    loop, model = make_loop([oracle, EMA(decay=0.9)])
    loop.fit(model, epochs=2, device="cpu")
    # AveragedModel's integer buffer (num_batches_tracked) is averaged as a float and truncated: left out.
    assert_close_state(floating(model.state_dict()), floating(oracle.model.module.state_dict()))


class SeenInValidation(Callback):
    "The weights validation runs on (after EMA's swap: order 70 > 60), and those training ends and starts with."
    order = 70
    def fit_start(self, loop): self.validated, self.training_end, self.training_start = {}, {}, {}
    def training_start(self, loop): self.training_start[loop.epoch_index] = floating(loop.model.state_dict())
    def training_end(self, loop): self.training_end[loop.epoch_index] = floating(loop.model.state_dict())
    def validation_start(self, loop): self.validated[loop.epoch_index] = floating(loop.model.state_dict())


def test_validation_runs_on_the_averages_and_training_goes_on_from_its_own_weights():
    weights, seen = StepWeights(), SeenInValidation()
    loop, model = make_loop([weights, EMA(decay=0.7), seen])
    history = loop.fit(model, epochs=3, device="cpu")
    for epoch in range(3):
        step = (epoch + 1) * 4
        average = hand_ema(weights.after, 0.7, 1, step)
        assert_close_state(seen.validated[epoch], average)
        assert not torch.equal(seen.validated[epoch]["0.weight"], weights.after[step]["0.weight"])
        if epoch < 2:  # bitwise: the next epoch trains on from the weights training ended with
            assert all(torch.equal(v, seen.training_end[epoch][k]) for k, v in seen.training_start[epoch + 1].items())
        # valid_loss is the averaged model's
        averaged = copy.deepcopy(model)
        averaged.load_state_dict({**model.state_dict(), **average})
        averaged.eval()
        with torch.no_grad():
            losses = [torch.nn.functional.cross_entropy(averaged(x), y, reduction="sum") for x, y in loop.validation]
        assert history[epoch]["valid_loss"] == pytest.approx((sum(losses) / 10).item(), rel=1e-5)


def test_after_an_error_the_model_keeps_its_training_weights_and_copy_to_gives_the_averages():
    weights, seen, ema = StepWeights(), SeenInValidation(), EMA(decay=0.7)
    loop, model = make_loop([weights, ema, seen, RaiseAt(Event.batch_end, 4 + 1, RuntimeError)])  # in validation
    with pytest.raises(RuntimeError): loop.fit(model, epochs=3, device="cpu")
    assert loop.phase is None and loop.step == 4
    assert all(torch.equal(v, seen.training_end[0][k]) for k, v in floating(model.state_dict()).items())
    averaged = copy.deepcopy(model)
    ema.copy_to(averaged)
    assert_close_state(floating(averaged.state_dict()), hand_ema(weights.after, 0.7, 1, 4))


def test_a_step_whose_batch_end_was_cut_short_is_averaged_at_fit_end():
    # The error comes at the 3rd training batch_end, after the step, before EMA's handler (order 50 < 60).
    weights, ema = StepWeights(), EMA(decay=0.7)
    loop, model = make_loop([weights, ema, RaiseAt(Event.batch_end, 3, RuntimeError)])
    with pytest.raises(RuntimeError): loop.fit(model, epochs=3, device="cpu")
    assert loop.step == ema.updates == 3
    averaged = copy.deepcopy(model)
    ema.copy_to(averaged)
    assert_close_state(floating(averaged.state_dict()), hand_ema(weights.after, 0.7, 1, 3))


def test_no_host_read():
    def reads(callbacks):
        loop, model = make_loop(callbacks)
        with count_host_reads() as count: loop.fit(model, epochs=2, device="cpu")
        return count[0]
    # Whatever the loop itself reads (once per phase), the EMA adds nothing: not per step, not per validation.
    assert reads([EMA(decay=0.9)]) == reads([])


# --- stopped and resumed -----------------------------------------------------------------------------------------------
def run(extra=(), ema=None):
    """The resume tests' run: dropout, Adam, EMA every 2 steps, 3 training and 2 validation batches an epoch. No
    BatchNorm: a run stopped between a batch's forward pass and its step (at update_start) updated its running
    statistics in that forward pass, and the resumed run replays the batch (the loop's limitation, EMA or not)."""
    ema = ema or EMA(decay=0.8, every_steps=2)
    loop, model = make_loop([ema, *extra], batches=3, optimizer="adam", dropout=0.3, batchnorm=False)
    return loop, model, ema


@pytest.fixture(scope="module")
def reference():
    seen = []
    loop, model, ema = run([lambda loop, event: seen.append(event)])
    history = loop.fit(model, epochs=2, device="cpu")
    return {"weights": copy.deepcopy(model.state_dict()), "ema": copy.deepcopy(ema.state_dict()), "events": seen,
            "history": [{k: v for k, v in r.items() if k != "time"} for r in history]}


def check_same(reference, model, ema, history):
    assert all(torch.equal(v, reference["weights"][k]) for k, v in model.state_dict().items())
    state, expected = ema.state_dict(), reference["ema"]
    assert state["updates"] == expected["updates"] and state["step"] == expected["step"]
    assert all(torch.equal(v, expected["averages"][k]) for k, v in state["averages"].items())
    assert [{k: v for k, v in r.items() if k != "time"} for r in history] == reference["history"]


def test_stopped_at_each_event_resumes_bitwise(reference, tmp_path):
    counts = {}
    for event in reference["events"]: counts[event] = counts.get(event, 0) + 1
    # Each event's first, second and last time: in both epochs, in training and validation, after steps 1 and 2
    # (EMA updates every 2 steps: a stop at batch_end #2 comes after a step due for an update, before EMA saw it).
    points = sorted({(event, min(n, count)) for event, count in counts.items() if event is not Event.fit_end
                     for n in (1, 2, count)})
    assert len(points) > 15 and {e for e, _ in points} == set(Event) - {Event.fit_end}
    for i, (event, n) in enumerate(points):
        where = f"KeyboardInterrupt at {event.value} #{n}"
        directory = tmp_path / f"run{i}"  # from the checkpoint written at the stop, in fresh objects
        loop, model, ema = run([RaiseAt(event, n), Checkpoint(directory)])
        with pytest.raises(KeyboardInterrupt): loop.fit(model, epochs=2, device="cpu")
        loop, model, ema = run([Checkpoint(directory)])
        history = loop.fit(model, epochs=2, device="cpu", resume_from=directory)
        try: check_same(reference, model, ema, history)
        except AssertionError as e: raise AssertionError(f"{where}, resumed from the checkpoint") from e
        loop, model, ema = run([RaiseAt(event, n)])  # in memory
        with pytest.raises(KeyboardInterrupt): loop.fit(model, epochs=2, device="cpu")
        history = loop.resume()
        try: check_same(reference, model, ema, history)
        except AssertionError as e: raise AssertionError(f"{where}, resumed in memory") from e


def test_a_crash_resumes_from_the_last_every_steps_checkpoint(reference, tmp_path):
    # An error (not Ctrl-C) writes no checkpoint at the stop: the run continues from the one of step 4.
    loop, model, ema = run([RaiseAt(Event.update_start, 6, RuntimeError), Checkpoint(tmp_path, every_steps=2)])
    with pytest.raises(RuntimeError): loop.fit(model, epochs=2, device="cpu")
    loop, model, ema = run([Checkpoint(tmp_path, every_steps=2)])
    history = loop.fit(model, epochs=2, device="cpu", resume_from=tmp_path / "step-00000004.pt")
    check_same(reference, model, ema, history)


class TakeState(Callback):
    "A copy of the loop's state at the second batch_end of `phase`, taken before EMA's handler (order 55) or after (70)."
    def __init__(self, phase: str, order: int): self.phase, self.order, self.count, self.state = phase, order, 0, None
    def batch_end(self, loop):
        if loop.phase != self.phase: return
        self.count += 1
        if self.count == 2: self.state = copy.deepcopy(loop.state_dict())


@pytest.mark.parametrize("phase,order", [("validation", 70), ("training", 55)])
def test_a_state_taken_by_another_callback_resumes_bitwise(reference, phase, order):
    # In validation the model holds the averages (the state keeps the training weights too); in training, before
    # EMA's batch_end, the state is of a step due for an update (step 2) that EMA has not made yet.
    take = TakeState(phase, order)
    loop, model, ema = run([take])
    loop.fit(model, epochs=2, device="cpu")
    assert (take.state["callbacks"]["EMA"]["training_weights"] is not None) == (phase == "validation")
    loop, model, ema = run()
    history = loop.fit(model, epochs=2, device="cpu", resume_from=take.state)
    check_same(reference, model, ema, history)


def test_a_model_with_extra_state_is_averaged_without_it():
    class Tagged(torch.nn.Linear):
        "A layer whose state_dict holds a non-tensor extra state (as some quantised or sharded layers do)."
        def get_extra_state(self): return {"tag": "v1"}
        def set_extra_state(self, state): pass
    ema = EMA(decay=0.5)
    loop, model = make_loop([ema])
    model[4] = Tagged(12, 2)
    loop.optimizer.add_param_group({"params": model[4].parameters()})
    loop.fit(model, epochs=1, device="cpu")
    assert ema.updates == 4 and "4._extra_state" not in ema.state_dict()["averages"]


def test_a_new_fit_is_a_new_run():
    ema = EMA(decay=0.5)
    loop, model = make_loop([ema])
    loop.fit(model, epochs=1, device="cpu")
    loop.fit(model, epochs=1, device="cpu")
    assert ema.updates == loop.step == 4  # counted from the second fit's first step


def test_bad_arguments_and_states_are_refused_with_what_to_do():
    with pytest.raises(ValueError, match="decay must be a number from 0 to 1"): EMA(decay=1.5)
    with pytest.raises(ValueError, match="every_steps must be a whole number"): EMA(every_steps=0)
    with pytest.raises(RuntimeError, match="no average yet"): EMA().copy_to(torch.nn.Linear(2, 2))
    state = EMA(decay=0.9).state_dict()
    with pytest.raises(ValueError, match="resume the run with the EMA it was started with"): EMA(decay=0.99).load_state_dict(state)
    with pytest.raises(ValueError, match="missing"): EMA().load_state_dict({"decay": 0.999})
    ema = EMA(decay=0.5)
    loop, model = make_loop([ema])
    loop.fit(model, epochs=1, device="cpu")
    with pytest.raises(ValueError, match="a model of the architecture"): ema.copy_to(torch.nn.Linear(5, 2))
