"""schedule_designer: the code it writes is the schedule it shows, edits and refusals, lengths from a loop; and the
three 'looking inside' modules import no display library until they draw."""
from __future__ import annotations

import html

import pytest
import torch

from trainloop_nb.callbacks.schedule import (ScheduleSegment, constant, cosine, exponential, linear, make_schedule)
from trainloop_nb.data import Digits
from trainloop_nb.designer import ScheduleDesigner, schedule_designer
from trainloop_nb.loop import TrainingLoop

NAMESPACE = {"make_schedule": make_schedule, "ScheduleSegment": ScheduleSegment, "linear": linear, "cosine": cosine,
             "exponential": exponential, "constant": constant}


def test_code_round_trips_to_the_same_rates():
    segments = [ScheduleSegment(constant, end_rate=1e-4, step_count=5),
                ScheduleSegment(exponential, start_rate=1e-4, end_rate=0.3, step_count=17),
                ScheduleSegment(cosine, end_rate=1 / 3)]
    d = schedule_designer(epochs=4, batches_per_epoch=25, segments=segments)
    assert d.segments == segments
    rebuilt = eval(d.code(), NAMESPACE)
    assert list(rebuilt(100)) == list(d.schedule) == list(make_schedule(segments)(100))
    assert "end_rate=0.3333333333333333" in d.code()  # floats written to read back exactly


def test_edits_redraw_and_refusals_are_messages():
    d = schedule_designer(epochs=2, batches_per_epoch=10)
    assert [s.shape.name for s in d.segments] == ["linear", "cosine"] and d.error is None
    picture = d.plot.value
    d.rows[0]["end"].value = "0.2"
    assert d.plot.value != picture and d.segments[0].end_rate == 0.2 and "end_rate=0.2" in d.code_view.value
    def refusal(make) -> str:
        "The schedule module's own message (the designer must show it, not its own wording)."
        with pytest.raises((ValueError, TypeError)) as info: make()
        return str(info.value)
    too_long = refusal(lambda: make_schedule([ScheduleSegment(linear, start_rate=0.0, end_rate=0.2, step_count=30),
                                              ScheduleSegment(cosine, end_rate=0.0)])(20))
    negative = refusal(lambda: ScheduleSegment(linear, start_rate=-1.0, end_rate=0.2, step_count=2))
    for field, text, message in [("end", "fast", "segment 1: end rate is 'fast', not a number"),
                                 ("steps", "2.5", "segment 1: step count is '2.5', not a whole number"),
                                 ("steps", "30", too_long), ("start", "-1", "segment 1: " + negative)]:
        old = d.rows[0][field].value
        d.rows[0][field].value = text
        assert d.error == message
        assert html.escape(message) in d.message.value
        with pytest.raises(ValueError): d.code()
        d.rows[0][field].value = old
        assert d.error is None and d.message.value == ""
    d.batches_per_epoch.value = 50
    assert len(d.schedule) == 100 and d.total_steps == 100


def test_add_and_remove_segments():
    d = schedule_designer(epochs=1, batches_per_epoch=100)
    d.add_segment()
    assert len(d.rows) == 3 and d.error is None and d.segments[1].step_count == 45  # half of what was left
    assert [r["label"].value for r in d.rows] == ["1", "2", "3"]
    d.remove_segment(0)
    assert len(d.rows) == 2 and [r["label"].value for r in d.rows] == ["1", "2"]
    d.remove_segment(0); d.remove_segment(0)
    assert len(d.rows) == 1 and d.rows[0]["remove"].disabled  # the last one stays


def test_lengths_from_a_loop_and_bad_arguments():
    data = Digits(batch_size=64)
    model = torch.nn.Linear(64, 10)
    loop = TrainingLoop(data.training, data.validation, torch.optim.SGD(model.parameters(), lr=0.1))
    d = schedule_designer(loop=loop, epochs=3, segments=make_schedule([ScheduleSegment(linear, start_rate=0.1, end_rate=0)]))
    assert isinstance(d, ScheduleDesigner) and d.total_steps == 3 * len(data.training)
    assert "ScheduleDesigner(3 epochs x 22 batches" in repr(d)
    with pytest.raises(ValueError, match="epochs must be"): schedule_designer(epochs=0, batches_per_epoch=3)
    with pytest.raises(TypeError, match="ScheduleSegments"): schedule_designer(segments=[1, 2])
    loop.training = iter([])
    with pytest.raises(TypeError, match="batches_per_epoch="): schedule_designer(loop=loop)


def test_modules_import_no_display_library():
    from toy_runs import display_modules_loaded_by
    loaded = display_modules_loaded_by("import trainloop_nb.summary, trainloop_nb.interpret, trainloop_nb.designer")
    assert [m for m in loaded if not m.startswith("trainloop_nb.")] == []  # the schedule module itself is no display
