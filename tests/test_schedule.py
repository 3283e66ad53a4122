"""Learning-rate schedules: segment semantics against closed forms and against the first (eager) implementation,
every invalid case, memory that does not grow with the step count, the callback in real fits (parameter groups,
bounded record, state for resuming), and plot_schedule's figure and PNG."""
import io
import math
import timeit
import tracemalloc

import matplotlib

matplotlib.use("Agg")  # the plots must work without any display

import matplotlib.image
import numpy as np
import pytest
import torch

from trainloop_nb.core import Callback
from trainloop_nb.loop import TrainingLoop
from trainloop_nb.losses import mean_squared_error
from trainloop_nb.callbacks.schedule import (LearningRateScheduler, Schedule, ScheduleFunction, ScheduleSegment, Shape,
                                   constant, cosine, exponential, linear, make_schedule, plot_schedule)

PEAK = 0.1


def warmup_decay():
    return make_schedule([ScheduleSegment(linear, start_rate=0, end_rate=PEAK, step_count=10),
                          ScheduleSegment(linear, end_rate=0)])


# -- the schedule semantics -------------------------------------------------------------------------

def test_warmup_then_decay_exactly_as_documented():
    rates = warmup_decay()(100)
    assert isinstance(rates, Schedule) and len(rates) == 100 and len(rates.tolist()) == 100
    assert rates[0] == 0.0 and rates[9] == PEAK and rates[99] == 0.0
    assert max(rates) == PEAK and rates.tolist().index(PEAK) == 9
    np.testing.assert_allclose(rates[:10], np.linspace(0, PEAK, 10), rtol=1e-15, atol=0)
    np.testing.assert_allclose(rates[9:], np.linspace(PEAK, 0, 91), rtol=1e-12, atol=1e-17)
    assert all(a < b for a, b in zip(rates[:9], rates[1:10])) and all(a > b for a, b in zip(rates[9:], rates[10:]))
    assert list(rates) == rates.tolist() and rates[-1] == 0.0
    assert all(type(r) is float for r in rates)


def test_neighbours_share_their_boundary_step():
    fn = make_schedule([ScheduleSegment(linear, start_rate=1.0, end_rate=2.0, step_count=3),
                        ScheduleSegment(linear, end_rate=4.0, step_count=3),
                        ScheduleSegment(linear, end_rate=7.0, step_count=4)])
    # 3 + 3 + 4 steps, less 2 shared = 8 steps: 1, 1.5, 2 | (2), 3, 4 | (4), 5, 6, 7
    assert fn.min_steps == 8
    assert fn(8).tolist() == [1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    assert fn(8).segment_starts == (0, 2, 4)


def test_start_rates_continue_from_the_previous_end_and_from_zero_first():
    rates = make_schedule([ScheduleSegment(linear, end_rate=0.4, step_count=5),
                           ScheduleSegment(cosine, end_rate=0.2, step_count=5),
                           ScheduleSegment(linear, end_rate=0.0)])(20)
    assert rates[0] == 0.0 and rates[4] == 0.4 and rates[8] == 0.2 and rates[19] == 0.0
    assert rates[5] == pytest.approx(0.4 + (0.2 - 0.4) * (1 - math.cos(math.pi * 0.25)) / 2, rel=1e-12)


def test_last_segment_without_step_count_ends_on_the_last_step():
    for total in (11, 12, 37, 1000):
        rates = warmup_decay()(total)
        assert len(rates) == total and rates[9] == PEAK and rates[total - 1] == 0.0 and rates[total - 2] > 0


def test_fixed_segments_shorter_than_the_fit_hold_the_last_rate():
    rates = make_schedule([ScheduleSegment(linear, start_rate=0.5, end_rate=0.1, step_count=5)])(9)
    assert rates.tolist()[4:] == [0.1] * 5
    np.testing.assert_allclose(rates[:5], [0.5, 0.4, 0.3, 0.2, 0.1], rtol=1e-12)


def test_a_jump_keeps_the_earlier_end_rate_on_the_shared_step():
    rates = make_schedule([ScheduleSegment(constant, end_rate=0.1, step_count=3),
                           ScheduleSegment(linear, start_rate=0.05, end_rate=0.0, step_count=3)])(5)
    assert rates.tolist() == [0.1, 0.1, 0.1, 0.025, 0.0]


def test_exactly_one_step_more_than_the_fixed_segments_is_enough():
    assert warmup_decay().min_steps == 11
    rates = warmup_decay()(11)
    assert rates.tolist()[9:] == [PEAK, 0.0]


@pytest.mark.parametrize("start,end", [(0.0, 1.0), (0.3, 0.05), (2.0, 2.0)])
def test_linear_closed_form(start, end):
    rates = make_schedule([ScheduleSegment(linear, start_rate=start, end_rate=end, step_count=11)])(11)
    assert rates[0] == start and rates[10] == end
    assert rates[5] == pytest.approx((start + end) / 2, rel=1e-12)
    assert rates[3] == pytest.approx(start + (end - start) * 0.3, rel=1e-12)


@pytest.mark.parametrize("start,end", [(0.0, 1.0), (0.3, 0.05)])
def test_cosine_closed_form(start, end):
    rates = make_schedule([ScheduleSegment(cosine, start_rate=start, end_rate=end, step_count=11)])(11)
    closed = lambda t: start + (end - start) * (1 - math.cos(math.pi * t)) / 2
    assert rates[0] == start and rates[10] == end
    assert rates[5] == pytest.approx((start + end) / 2, rel=1e-12)
    for i in range(11): assert rates[i] == pytest.approx(closed(i / 10), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("start,end", [(1.0, 0.01), (1e-4, 1e-1)])
def test_exponential_closed_form(start, end):
    rates = make_schedule([ScheduleSegment(exponential, start_rate=start, end_rate=end, step_count=11)])(11)
    assert rates[0] == start and rates[10] == end
    assert rates[5] == pytest.approx(math.sqrt(start * end), rel=1e-12)  # geometric midpoint
    ratios = [b / a for a, b in zip(rates, rates[1:])]
    assert ratios == pytest.approx([(end / start) ** 0.1] * 10, rel=1e-12)  # a constant factor per step


def test_constant_holds_its_rate_and_its_left_out_start_is_its_end_rate():
    rates = make_schedule([ScheduleSegment(linear, end_rate=0.2, step_count=3),
                           ScheduleSegment(constant, end_rate=0.2, step_count=4),
                           ScheduleSegment(constant, start_rate=0.05, end_rate=0.05)])(10)
    assert rates.tolist() == [0.0, 0.1, 0.2, 0.2, 0.2, 0.2, 0.05, 0.05, 0.05, 0.05]


def test_custom_shape_closed_form_and_checks():
    square = Shape(lambda t: t * t, "square")
    rates = make_schedule([ScheduleSegment(square, start_rate=1.0, end_rate=3.0, step_count=5)])(5)
    assert rates[0] == 1.0 and rates[4] == 3.0 and rates[2] == pytest.approx(1.0 + 2.0 * 0.25)
    assert repr(square) == "square"
    with pytest.raises(ValueError, match=r"f\(0\) must be 0"): Shape(lambda t: t + 0.1)
    with pytest.raises(ValueError, match=r"f\(1\) must be 1"): Shape(lambda t: 0.5 * t)
    with pytest.raises(ValueError, match="monotone"): Shape(lambda t: t - 0.3 * math.sin(2 * math.pi * t))
    with pytest.raises(ValueError, match="finite"): Shape(lambda t: t if t < 0.5 else float("nan"))
    with pytest.raises(ValueError, match="must take one float"): Shape(lambda: 0)
    with pytest.raises(TypeError, match="function of progress"): Shape(0.5)


def test_builtin_shapes_pass_their_own_curve_checks():
    Shape(lambda t: linear.rate(0.0, 1.0, t))
    Shape(lambda t: cosine.rate(0.0, 1.0, t))


# -- invalid schedules fail before training, with clear messages ---------------------------------------

def test_empty_segment_list():
    with pytest.raises(ValueError, match="at least one ScheduleSegment"): make_schedule([])


def test_only_the_last_segment_may_leave_out_step_count():
    with pytest.raises(ValueError, match="segment 1 of 2 has no step_count; only the last segment may leave it out"):
        make_schedule([ScheduleSegment(linear, end_rate=0.1), ScheduleSegment(linear, end_rate=0)])


def test_segments_needing_more_steps_than_the_fit():
    fn = make_schedule([ScheduleSegment(linear, end_rate=0.1, step_count=10),
                        ScheduleSegment(linear, end_rate=0, step_count=20)])
    with pytest.raises(ValueError, match=r"needs at least 29 steps .* but the fit has 28"): fn(28)
    assert len(fn(29)) == 29
    with pytest.raises(ValueError, match=r"needs at least 11 steps .*at least 2.* but the fit has 10"): warmup_decay()(10)
    with pytest.raises(ValueError, match="total_steps must be a whole number"): warmup_decay()(0)


@pytest.mark.parametrize("count", [1, 0, -3, 2.5, True])
def test_step_count_below_two(count):
    with pytest.raises(ValueError, match="step_count must be a whole number of at least 2"):
        ScheduleSegment(linear, end_rate=0.1, step_count=count)


@pytest.mark.parametrize("kwargs,name", [(dict(end_rate=-0.1), "end_rate"), (dict(start_rate=-1e-3, end_rate=0.1), "start_rate")])
def test_negative_rates(kwargs, name):
    with pytest.raises(ValueError, match=f"{name} must not be negative"): ScheduleSegment(linear, **kwargs)


def test_non_finite_and_missing_rates():
    with pytest.raises(ValueError, match="finite number"): ScheduleSegment(linear, end_rate=float("inf"))
    with pytest.raises(ValueError, match="finite number"): ScheduleSegment(linear, end_rate="0.1")
    with pytest.raises(TypeError, match="needs end_rate"): ScheduleSegment(linear, start_rate=0.1)


def test_exponential_towards_or_from_zero():
    with pytest.raises(ValueError, match="never reaches 0; give it a small positive end_rate"):
        ScheduleSegment(exponential, start_rate=0.1, end_rate=0)
    with pytest.raises(ValueError, match="cannot grow from 0; give it a small positive start_rate"):
        ScheduleSegment(exponential, start_rate=0, end_rate=0.1)
    # a left-out start rate continues from 0 for a first segment, and from a previous end of 0 later
    with pytest.raises(ValueError, match=r"segment 1 \(its start rate was left out, so it continues from 0"):
        make_schedule([ScheduleSegment(exponential, end_rate=0.1)])
    with pytest.raises(ValueError, match=r"segment 2 .*previous end rate.*cannot grow from 0"):
        make_schedule([ScheduleSegment(linear, start_rate=1.0, end_rate=0, step_count=5),
                       ScheduleSegment(exponential, end_rate=0.1)])


def test_constant_with_two_different_rates():
    with pytest.raises(ValueError, match="constant segment holds one rate"):
        ScheduleSegment(constant, start_rate=0.1, end_rate=0.2)


def test_wrong_types():
    with pytest.raises(TypeError, match=r"wrap a curve f\(t\) with Shape"): ScheduleSegment(lambda t: t, end_rate=0.1)
    with pytest.raises(TypeError, match="must be a Shape"): ScheduleSegment("linear", end_rate=0.1)
    with pytest.raises(TypeError, match="make_schedule takes a list of ScheduleSegment"): make_schedule([0.1])
    with pytest.raises(TypeError, match="must hold ScheduleSegments"): LearningRateScheduler([0.1, 0.2])
    with pytest.raises(TypeError, match="a schedule must be"): LearningRateScheduler(0.1)


# -- LearningRateScheduler in real fits -----------------------------------------------------------------

class RecordRates(Callback):
    "What the optimizer's groups hold just before each step."
    def fit_start(self, loop): self.seen = []
    def update_start(self, loop): self.seen.append((loop.step, [g["lr"] for g in loop.optimizer.param_groups]))


def small_fit(schedule, epochs, batches=4, total_steps=None, data=None):
    torch.manual_seed(0)
    x = torch.randn(16 * batches, 3)
    data = data if data is not None else [(x[i:i + 16], x[i:i + 16].sum(1, keepdim=True)) for i in range(0, 16 * batches, 16)]
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    optimizer = torch.optim.SGD([{"params": model[0].parameters(), "lr": 1.0},
                                 {"params": model[1].parameters(), "lr": 2.0}], lr=1.0, momentum=0.9)
    scheduler = schedule if isinstance(schedule, LearningRateScheduler) else LearningRateScheduler(schedule, total_steps)
    recorder = RecordRates()
    loop = TrainingLoop(data, validation=data[:1] if isinstance(data, list) else None, optimizer=optimizer,
                        loss_func=mean_squared_error, callbacks=[scheduler, recorder], include_default_callbacks=False,
                        stop_on_nonfinite=False)  # rates up to 2 x PEAK diverge on this data: only the rates are under test
    loop.fit(model, epochs=epochs)
    return loop, scheduler, recorder


def test_the_optimizer_rate_at_each_step_is_the_schedule():
    loop, scheduler, recorder = small_fit(warmup_decay(), epochs=5)
    expected = warmup_decay()(20).tolist()
    assert [step for step, _ in recorder.seen] == list(range(20))
    # every parameter group, keeping their ratio: the second group started at 2.0 against the first's 1.0
    assert [lrs for _, lrs in recorder.seen] == [[r, 2 * r] for r in expected]
    assert scheduler.rates_applied == list(enumerate(expected))  # training steps only: validation sets nothing
    assert scheduler.fit_steps == 20 and scheduler.batches_per_epoch == 4 and scheduler.epoch_count == 5
    assert [g["lr"] for g in loop.optimizer.param_groups] == [1.0, 2.0]  # the rates found are put back at fit_end
    assert loop.learning_rate == 1.0 and recorder.seen[-1][1][0] == 0.0


def test_the_schedule_is_recomputed_for_every_fit():
    scheduler = LearningRateScheduler(warmup_decay())
    _, _, first = small_fit(scheduler, epochs=5)
    _, _, second = small_fit(scheduler, epochs=3)
    assert [lrs[0] for _, lrs in first.seen] == warmup_decay()(20).tolist()
    assert [lrs[0] for _, lrs in second.seen] == warmup_decay()(12).tolist()
    assert scheduler.rates_applied == list(enumerate(warmup_decay()(12)))  # reset per fit
    assert scheduler.rates[9] == PEAK and scheduler.rates[11] == 0.0 and len(scheduler.rates) == 12


def test_segments_and_plain_callables_are_accepted():
    segments = [ScheduleSegment(linear, start_rate=0, end_rate=PEAK, step_count=10), ScheduleSegment(linear, end_rate=0)]
    _, from_segments, _ = small_fit(segments, epochs=4)
    assert from_segments.rates.tolist() == warmup_decay()(16).tolist()
    _, from_callable, recorder = small_fit(lambda total: [0.5 / (1 + s) for s in range(total)], epochs=2)
    assert [lrs[0] for _, lrs in recorder.seen] == [0.5 / (1 + s) for s in range(8)]
    assert isinstance(LearningRateScheduler(segments).schedule_fn, ScheduleFunction)


def test_steps_beyond_the_schedule_use_its_last_rate():
    _, scheduler, recorder = small_fit(lambda total: [0.3, 0.2, 0.1], epochs=2)
    assert [lrs[0] for _, lrs in recorder.seen] == [0.3, 0.2, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]


def test_data_without_len_needs_total_steps():
    class NoLen:
        def __init__(self, batches): self.batches = batches
        def __iter__(self): return iter(self.batches)
    x = torch.randn(32, 3)
    data = NoLen([(x[:16], x[:16, :1]), (x[16:], x[16:, :1])])
    with pytest.raises(TypeError, match=r"has no len\(\); pass it: LearningRateScheduler\(schedule, total_steps="):
        small_fit(warmup_decay(), epochs=6, data=data)
    _, scheduler, recorder = small_fit(warmup_decay(), epochs=6, data=data, total_steps=12)
    assert [lrs[0] for _, lrs in recorder.seen] == warmup_decay()(12).tolist()


def test_total_steps_override_and_a_too_short_fit_fails_before_any_step():
    _, scheduler, recorder = small_fit(warmup_decay(), epochs=2, total_steps=20)
    assert scheduler.rates.tolist() == warmup_decay()(20).tolist() and len(recorder.seen) == 8
    with pytest.raises(ValueError, match="needs at least 11 steps") as info:
        small_fit(warmup_decay(), epochs=2)  # 8 steps
    assert any("LearningRateScheduler at event fit_start" in n for n in getattr(info.value, "__notes__", []))


def test_a_schedule_function_returning_bad_rates():
    with pytest.raises(ValueError, match="rate at step 1 is -0.1"): small_fit(lambda total: [0.1, -0.1], epochs=1)
    with pytest.raises(ValueError, match="returned no rates"): small_fit(lambda total: [], epochs=1)
    with pytest.raises(ValueError, match="total_steps must be a whole number"): LearningRateScheduler(warmup_decay(), 0)


def test_a_tensor_learning_rate_is_filled_in_place():
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=torch.tensor(0.01))
    lr_tensor = optimizer.param_groups[0]["lr"]
    x = torch.randn(32, 3)
    scheduler = LearningRateScheduler(warmup_decay())
    loop = TrainingLoop([(x[:16], x[:16, :1]), (x[16:], x[16:, :1])], optimizer=optimizer,
                        loss_func=mean_squared_error, callbacks=[scheduler], include_default_callbacks=False)
    seen = []
    loop.fit(model, epochs=6, callbacks=[lambda loop, event: event == "update_start" and seen.append(lr_tensor.item())])
    assert optimizer.param_groups[0]["lr"] is lr_tensor
    assert seen == pytest.approx(warmup_decay()(12).tolist(), rel=1e-7)  # a float32 tensor holds each rate
    assert lr_tensor.item() == pytest.approx(0.01)  # put back in place at fit_end


def test_the_scheduler_reads_nothing_from_tensors(monkeypatch):
    "No .item()/float() on a tensor in the per-step path: such a read would be a device sync on a GPU."
    calls = []
    original_item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda self: calls.append("item") or original_item(self))
    scheduler = LearningRateScheduler(warmup_decay())

    class Loop:  # only what the callback touches
        phase, epoch_count, training = "training", 2, [None] * 8
        optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0)
    loop = Loop()
    scheduler.fit_start(loop)
    for loop.step in range(16): scheduler.batch_start(loop)
    assert calls == [] and [r for _, r in scheduler.rates_applied][-1] == 0.0


# -- plot_schedule ----------------------------------------------------------------------------------------

def lines_by_gid(fig, gid):
    return [line for line in fig.axes[0].get_lines() if line.get_gid() == gid]


def test_plot_before_training_from_epochs_and_batches():
    fig = plot_schedule(warmup_decay()(100), epochs=5)
    assert isinstance(fig, matplotlib.figure.Figure)
    (schedule_line,) = lines_by_gid(fig, "schedule")
    assert len(schedule_line.get_xdata()) == 100
    assert list(schedule_line.get_ydata()) == warmup_decay()(100).tolist()
    epoch_lines = lines_by_gid(fig, "epoch")
    assert len(epoch_lines) == 4 and [l.get_xdata()[0] for l in epoch_lines] == [20, 40, 60, 80]
    assert lines_by_gid(fig, "applied") == []


def test_plot_from_total_steps_segments_or_a_schedule():
    segments = [ScheduleSegment(cosine, start_rate=0.1, end_rate=0.001)]
    fig = plot_schedule(segments, total_steps=50)
    assert len(lines_by_gid(fig, "schedule")[0].get_xdata()) == 50 and lines_by_gid(fig, "epoch") == []
    fig = plot_schedule(segments, total_steps=60, epochs=3)
    assert [l.get_xdata()[0] for l in lines_by_gid(fig, "epoch")] == [20, 40]
    loop = TrainingLoop([None] * 7, optimizer=torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1))
    fig = plot_schedule(warmup_decay(), epochs=3, total_steps=3 * len(loop.training))
    assert len(lines_by_gid(fig, "schedule")[0].get_xdata()) == 21 and len(lines_by_gid(fig, "epoch")) == 2
    fig = plot_schedule(warmup_decay()(30))  # rates already computed
    assert len(lines_by_gid(fig, "schedule")[0].get_xdata()) == 30


def test_plot_needs_the_length_of_the_run():
    with pytest.raises(ValueError, match="needs the length of the run"): plot_schedule(warmup_decay())
    with pytest.raises(ValueError, match="needs the length of the run"): plot_schedule(warmup_decay(), epochs=3)
    with pytest.raises(ValueError, match="has its own length, 20 steps, not total_steps=30"):
        plot_schedule(warmup_decay()(20), total_steps=30, epochs=2)
    with pytest.raises(ValueError, match="needs at least 11 steps"): plot_schedule(warmup_decay(), total_steps=5)


def test_plot_after_a_fit_overlays_the_applied_rates():
    _, scheduler, _ = small_fit(warmup_decay(), epochs=5)
    for fig in (scheduler.plot(), plot_schedule(scheduler.rates, 5, scheduler.rates_applied),
                plot_schedule(warmup_decay(), epochs=5, total_steps=20, applied=scheduler.rates_applied)):
        (applied,) = lines_by_gid(fig, "applied")
        assert list(zip(applied.get_xdata(), applied.get_ydata())) == scheduler.rates_applied
        assert applied.get_linestyle() == "None" and applied.get_marker() == "o"
        assert len(lines_by_gid(fig, "schedule")[0].get_xdata()) == 20 and len(lines_by_gid(fig, "epoch")) == 4


def test_plot_saves_a_png_that_reads_back(tmp_path):
    path = tmp_path / "plots" / "schedule.png"
    fig = plot_schedule(warmup_decay()(100), epochs=4, path=path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0  # something was drawn
    other = tmp_path / "again.png"
    fig.savefig(other)  # the returned figure still saves after plot_schedule closed it in pyplot
    assert other.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_into_given_axes_and_pyplot_keeps_no_figure():
    import matplotlib.pyplot as plt
    plt.close("all")
    plot_schedule(warmup_decay(), total_steps=40)
    assert plt.get_fignums() == []  # closed in pyplot's registry: Jupyter shows the returned figure once
    fig, (left, right) = plt.subplots(1, 2)
    returned = plot_schedule(warmup_decay(), total_steps=40, ax=right)
    assert returned is fig and len(right.get_lines()) == 1 and len(left.get_lines()) == 0
    plt.close(fig)
    assert matplotlib.get_backend().lower() == "agg"


# -- the lazy schedule against the first, eager implementation ----------------------------------------

def old_eager_rates(segments, total_steps):
    "The per-step list the first implementation computed with numpy (copied from git history, d15337e), as the oracle."
    curves = {"linear": lambda t: t, "cosine": lambda t: (1 - np.cos(np.pi * t)) / 2}
    def interpolate(shape, start, end, t):
        if shape.name == "exponential": return start * (end / start) ** np.asarray(t, dtype=np.float64)
        if shape.name == "constant": return np.full(len(t), float(start))
        f = (curves[shape.name](np.asarray(t, dtype=np.float64)) if shape.name in curves
             else np.array([float(shape.fn(float(x))) for x in t], dtype=np.float64))
        return (1 - f) * start + f * end
    start_rates, previous_end = [], 0.0
    for segment in segments:
        if segment.start_rate is not None: start = float(segment.start_rate)
        elif segment.shape is constant: start = float(segment.end_rate)
        else: start = previous_end
        start_rates.append(start)
        previous_end = float(segment.end_rate)
    rates, first = np.empty(total_steps), 0
    for i, (segment, start) in enumerate(zip(segments, start_rates)):
        count = segment.step_count or total_steps - first
        progress = np.arange(count) / (count - 1)
        part = interpolate(segment.shape, start, segment.end_rate, progress)
        part[0], part[-1] = start, segment.end_rate
        skip = 0 if i == 0 else 1
        rates[first + skip:first + count] = part[skip:]
        first += count - 1
    rates[first + 1:] = rates[first]
    return rates.tolist()


SMOOTHSTEP = Shape(lambda t: t * t * (3 - 2 * t), "smoothstep")
COMBINATIONS = {
    "warm-up, linear decay": [ScheduleSegment(linear, start_rate=0, end_rate=PEAK, step_count=10),
                              ScheduleSegment(linear, end_rate=0)],
    "warm-up, cosine decay": [ScheduleSegment(linear, end_rate=3e-4, step_count=7), ScheduleSegment(cosine, end_rate=0)],
    "one-cycle with an exponential tail": [ScheduleSegment(cosine, start_rate=0.004, end_rate=0.1, step_count=30),
                                           ScheduleSegment(cosine, end_rate=0.01, step_count=60),
                                           ScheduleSegment(exponential, end_rate=1e-5)],
    "steps with jumps, held past the end": [ScheduleSegment(constant, end_rate=0.1, step_count=40),
                                            ScheduleSegment(constant, end_rate=0.01, step_count=40),
                                            ScheduleSegment(linear, start_rate=0.05, end_rate=0.002, step_count=9)],
    "custom curve, exponential rise": [ScheduleSegment(SMOOTHSTEP, start_rate=0.3, end_rate=1.7, step_count=13),
                                       ScheduleSegment(exponential, start_rate=1e-4, end_rate=2.0, step_count=21),
                                       ScheduleSegment(linear, end_rate=0.5)],
    "one open cosine": [ScheduleSegment(cosine, start_rate=1.0, end_rate=0.0)],
}


@pytest.mark.parametrize("name", list(COMBINATIONS))
@pytest.mark.parametrize("total", [100, 257, 1000])
def test_lazy_rates_equal_the_eager_implementation(name, total):
    segments = COMBINATIONS[name]
    new, old = make_schedule(segments)(total).tolist(), old_eager_rates(segments, total)
    assert len(new) == len(old) == total and all(type(r) is float for r in new)
    if any(s.shape in (cosine, exponential) for s in segments):
        # The oracle's numpy cos and power (SIMD code that differs from CPU to CPU in the last bit) against math's:
        # close, not equal. An absolute margin on the scale of the rates covers values that cancel towards 0.
        scale = max(abs(r) for r in old)
        np.testing.assert_allclose(new, old, rtol=1e-12, atol=1e-14 * scale)
    else: assert new == old  # bit for bit: only +, -, *, / here, which every CPU rounds the same way


# -- memory: what a schedule and the scheduler keep does not grow with the step count -------------------

def test_a_schedule_of_ten_million_steps_costs_kilobytes():
    segments = COMBINATIONS["one-cycle with an exponential tail"]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        schedule = make_schedule(segments)(10**7)
        built = tracemalloc.get_traced_memory()[0] - before
        queried = [schedule[step] for step in range(0, 10**7, 9973)]  # a thousand lookups over the whole run
        last, peak = schedule[-1], tracemalloc.get_traced_memory()[1] - before
    finally: tracemalloc.stop()
    assert len(schedule) == 10**7 and built < 20_000 and peak < 1_000_000, (built, peak)
    assert schedule[29] == 0.1 and schedule[88] == 0.01 and last == schedule[10**7 - 1] == 1e-5
    assert queried[0] == 0.004 and all(a >= b for a, b in zip(queried[1:], queried[2:]))  # past the peak: falls
    for step in (0, 15, 29, 30, 88, 89, 5_000_000, 10**7 - 2):  # spot checks against the closed forms
        if step <= 29: expected = 0.004 + (0.1 - 0.004) * (1 - math.cos(math.pi * step / 29)) / 2
        elif step <= 88: expected = 0.1 + (0.01 - 0.1) * (1 - math.cos(math.pi * (step - 29) / 59)) / 2
        else: expected = 0.01 * (1e-5 / 0.01) ** ((step - 88) / (10**7 - 1 - 88))
        assert schedule[step] == pytest.approx(expected, rel=1e-12), step


class FakeLoop:
    "Only what LearningRateScheduler touches: a long run driven by hand, without a model."
    def __init__(self, batches=1000, epochs=100, lrs=(1.0,)):
        self.phase, self.epoch_count, self.training, self.step = "training", epochs, range(batches), 0
        params = [torch.nn.Parameter(torch.zeros(1)) for _ in lrs]
        self.optimizer = torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, lrs)])

    def run(self, scheduler, steps, start=0):
        for self.step in range(start, steps): scheduler.batch_start(self)


def test_the_record_stays_bounded_over_a_long_run():
    scheduler, loop = LearningRateScheduler(COMBINATIONS["warm-up, cosine decay"], max_points=500), FakeLoop()
    scheduler.fit_start(loop)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        loop.run(scheduler, 10**5)
        grown, peak = (m - before for m in tracemalloc.get_traced_memory())
    finally: tracemalloc.stop()
    points = scheduler.rates_applied
    assert 250 <= len(points) <= 500 and grown < 100_000 and peak < 200_000, (len(points), grown, peak)
    steps = [s for s, _ in points]
    assert steps[0] == 0 and steps[-1] == 10**5 - 1  # the whole run, to its last step
    gaps = {b - a for a, b in zip(steps[:-2], steps[1:-1])}
    assert gaps == {scheduler.stride} and scheduler.stride == 256  # evenly spaced
    assert all(rate == scheduler.rates[step] for step, rate in points)
    assert len(scheduler.state_dict()["rates_applied"]) == len(points)  # a checkpoint holds no per-step list


def test_the_same_step_twice_is_recorded_once():
    "With gradient accumulation batch_start fires several times per optimizer step."
    scheduler, loop = LearningRateScheduler(warmup_decay()), FakeLoop(batches=20, epochs=1)
    scheduler.fit_start(loop)
    for loop.step in (0, 0, 1, 1, 2, 2, 3): scheduler.batch_start(loop)
    assert [s for s, _ in scheduler.rates_applied] == [0, 1, 2, 3]


# -- Schedule: a function of the step plus its length ---------------------------------------------------

def test_a_plain_schedule_from_a_function():
    decay = Schedule(lambda step: 0.1 * 0.5 ** step, 4)
    assert len(decay) == 4 and decay.tolist() == [0.1, 0.05, 0.025, 0.0125] and list(decay) == decay.tolist()
    assert decay[-1] == 0.0125 and decay[1:3] == [0.05, 0.025] and decay.segment_starts == ()
    with pytest.raises(IndexError, match="step 4 is outside this schedule of 4 steps"): decay[4]
    with pytest.raises(TypeError, match="whole step number"): decay[1.5]
    with pytest.raises(TypeError, match="needs a function step -> rate"): Schedule([0.1, 0.2], 2)
    with pytest.raises(ValueError, match="length must be a whole number"): Schedule(lambda s: 0.1, 0)
    assert repr(warmup_decay()(100)) == "Schedule(100 steps; step 0: 0, step 9: 0.1, step 99: 0)"
    # the scheduler takes a Schedule as it is: its own length, its last rate held after it
    _, scheduler, recorder = small_fit(decay, epochs=2)
    assert [lrs[0] for _, lrs in recorder.seen] == [0.1, 0.05, 0.025, 0.0125, 0.0125, 0.0125, 0.0125, 0.0125]
    assert scheduler.rates is decay


def test_a_rate_a_schedule_function_gets_wrong_fails_at_its_step():
    with pytest.raises(ValueError, match="rate at step 2 is nan"):
        small_fit(Schedule(lambda step: 0.1 if step < 2 else float("nan"), 8), epochs=1)


# -- a 1-step fit ----------------------------------------------------------------------------------------

def test_a_one_step_fit_with_a_constant_schedule():
    hold = make_schedule([ScheduleSegment(constant, end_rate=0.05)])
    assert hold.min_steps == 1 and hold(1).tolist() == [0.05] and hold(3).tolist() == [0.05] * 3
    assert make_schedule([ScheduleSegment(linear, start_rate=0.2, end_rate=0.2)])(1).tolist() == [0.2]  # equal ends
    _, scheduler, recorder = small_fit([ScheduleSegment(constant, end_rate=0.05)], epochs=1, batches=1)
    assert recorder.seen == [(0, [0.05, 0.1])] and scheduler.fit_steps == 1


def test_a_one_step_fit_with_a_ramp_says_why_not():
    with pytest.raises(ValueError, match=r"needs at least 2 steps \(one segment of at least 2 steps\), but the fit has "
                                         r"1 .*only a lone segment whose start and end rates are equal \(a "
                                         r"constant\) can schedule a 1-step fit: use ScheduleSegment\(constant"):
        make_schedule([ScheduleSegment(linear, start_rate=0.1, end_rate=0)])(1)
    with pytest.raises(ValueError, match="needs at least 3 steps"):  # a later segment shares its first step
        make_schedule([ScheduleSegment(constant, end_rate=0.1, step_count=2), ScheduleSegment(constant, end_rate=0.1)])(2)


# -- parameter groups: their ratio is kept, and their rates are put back -------------------------------

def test_groups_keep_their_ratio_and_get_their_rates_back_after_an_error():
    class Fail(Callback):
        armed = True
        def batch_end(self, loop):
            if self.armed and loop.step == 5: raise RuntimeError("boom")
    scheduler = LearningRateScheduler(warmup_decay())
    data = [(torch.randn(4, 3), torch.randn(4, 1))] * 4
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    optimizer = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.5},
                                 {"params": model[1].parameters(), "lr": 0.05}])
    recorder, fail = RecordRates(), Fail()
    loop = TrainingLoop(data, optimizer=optimizer, loss_func=mean_squared_error,
                        callbacks=[scheduler, recorder, fail], include_default_callbacks=False)
    with pytest.raises(RuntimeError, match="boom"): loop.fit(model, epochs=5)
    assert [g["lr"] for g in optimizer.param_groups] == [0.5, 0.05]
    assert [step for step, _ in recorder.seen] == [0, 1, 2, 3, 4]
    assert [lrs for _, lrs in recorder.seen] == [[r, r * 0.1] for r in warmup_decay()(20)[:5]]
    fail.armed = False  # the same loop fits again from the rates it had, not from where the last fit stopped
    loop.fit(model, epochs=5)
    assert [lrs for _, lrs in recorder.seen] == [[r, r * 0.1] for r in warmup_decay()(20)]


def test_a_first_group_at_zero_has_no_ratio():
    loop = FakeLoop(lrs=(0.0, 0.1))
    with pytest.raises(ValueError, match="first parameter group has learning rate 0 .* ratio to it is undefined"):
        LearningRateScheduler(warmup_decay()).fit_start(loop)
    scheduler, loop = LearningRateScheduler(warmup_decay()), FakeLoop(lrs=(0.0, 0.0))  # equal rates: ratio 1
    scheduler.fit_start(loop)
    loop.run(scheduler, 10)
    assert [g["lr"] for g in loop.optimizer.param_groups] == [PEAK, PEAK]


def test_tensor_rates_in_several_groups():
    scheduler, loop = LearningRateScheduler(warmup_decay()), FakeLoop(batches=20, epochs=1)
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    loop.optimizer = torch.optim.Adam([{"params": [params[0]], "lr": torch.tensor(0.5)},
                                       {"params": [params[1]], "lr": torch.tensor(1.0)}])
    first, second = (g["lr"] for g in loop.optimizer.param_groups)
    scheduler.fit_start(loop)
    loop.run(scheduler, 10)
    assert first.item() == pytest.approx(PEAK) and second.item() == pytest.approx(2 * PEAK)
    scheduler.fit_end(loop)
    assert loop.optimizer.param_groups[0]["lr"] is first and (first.item(), second.item()) == (0.5, 1.0)


# -- state for resuming mid-schedule ---------------------------------------------------------------------

def resumed_copy(state):
    "The state as a new process gets it: through torch.save and torch.load."
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("load_before_fit_start", [True, False])
def test_state_dict_continues_the_schedule_in_a_new_scheduler(load_before_fit_start):
    schedule = COMBINATIONS["warm-up, cosine decay"]
    whole, loop = LearningRateScheduler(schedule, max_points=50), FakeLoop(batches=100, epochs=3, lrs=(1.0, 3.0))
    whole.fit_start(loop)
    loop.run(whole, 300)
    uninterrupted = list(whole.rates_applied)

    first, loop = LearningRateScheduler(schedule, max_points=50), FakeLoop(batches=100, epochs=3, lrs=(1.0, 3.0))
    first.fit_start(loop)
    loop.run(first, 137)
    state = resumed_copy(first.state_dict())
    assert set(state) == {"fit_steps", "found_rates", "rates_applied", "stride"} and state["found_rates"] == [1.0, 3.0]

    # the new process: its optimizer was loaded from the checkpoint, so it holds the rates of step 136, not 1 and 3
    second, loop = LearningRateScheduler(schedule, max_points=50), FakeLoop(batches=100, epochs=3, lrs=(1.0, 3.0))
    for group, ratio in zip(loop.optimizer.param_groups, (1, 3)): group["lr"] = first.rates[136] * ratio
    if load_before_fit_start: second.load_state_dict(state)
    second.fit_start(loop)
    if not load_before_fit_start: second.load_state_dict(state)
    loop.run(second, 300, start=137)
    assert second.rates_applied == uninterrupted and second.stride == whole.stride
    assert [g["lr"] for g in loop.optimizer.param_groups] == [whole.rates[299], 3 * whole.rates[299]]
    second.fit_end(loop)
    assert [g["lr"] for g in loop.optimizer.param_groups] == [1.0, 3.0]  # the rates of the original run's start


def test_state_dict_errors():
    with pytest.raises(KeyError, match="not a LearningRateScheduler state: it has no found_rates, stride"):
        LearningRateScheduler(warmup_decay()).load_state_dict({"fit_steps": 3, "rates_applied": []})
    scheduler, loop = LearningRateScheduler(warmup_decay()), FakeLoop(lrs=(0.1, 0.2))
    scheduler.fit_start(loop)
    resumed = LearningRateScheduler(warmup_decay())
    resumed.load_state_dict(scheduler.state_dict())
    with pytest.raises(ValueError, match="found 2 parameter groups when its run started, but the optimizer has 1"):
        resumed.fit_start(FakeLoop())


# -- plotting long runs ---------------------------------------------------------------------------------

def test_plotting_a_long_run_draws_a_few_thousand_points_with_every_corner():
    scheduler, loop = LearningRateScheduler(COMBINATIONS["steps with jumps, held past the end"]), FakeLoop(1000, 100)
    scheduler.fit_start(loop)
    loop.run(scheduler, 10**5)
    fig = scheduler.plot()
    (line,) = lines_by_gid(fig, "schedule")
    xs, ys = list(line.get_xdata()), list(line.get_ydata())
    assert 5000 <= len(xs) <= 5100 and xs == sorted(xs) and xs[-1] == 10**5 - 1
    assert {39, 40, 78, 79, 86, 87} <= set(xs)  # both sides of each jump, and where the hold starts
    assert all(y == scheduler.rates[x] for x, y in zip(xs, ys))
    (applied,) = lines_by_gid(fig, "applied")
    assert len(applied.get_xdata()) == len(scheduler.rates_applied) <= 1000
    assert lines_by_gid(fig, "epoch") == [] and "100 epochs" in fig.axes[0].get_title()  # no grey smear
    fig = plot_schedule(make_schedule(COMBINATIONS["warm-up, cosine decay"])(10**7), epochs=10)
    assert len(lines_by_gid(fig, "schedule")[0].get_xdata()) <= 5010 and len(lines_by_gid(fig, "epoch")) == 9


def test_plot_schedule_errors():
    with pytest.raises(TypeError, match=r"draw Schedule\(rates.__getitem__, len\(rates\)\)"): plot_schedule(object())
    with pytest.raises(RuntimeError, match="has not started a fit"): LearningRateScheduler(warmup_decay()).plot()
    with pytest.raises(ValueError, match="epochs must be a whole number"): plot_schedule(warmup_decay()(20), epochs=0)
    fig = plot_schedule([ScheduleSegment(linear, start_rate=0.1, end_rate=0.2, step_count=5)])  # fixed: its own length
    assert len(lines_by_gid(fig, "schedule")[0].get_xdata()) == 5
