"""fit(..., on_oom="split") (issue 24): a training batch that runs out of device memory is run again as micro-batches,
their gradients summed into the whole batch's step. On the CPU the models raise `torch.OutOfMemoryError` themselves
above a batch size (in the forward pass, or in backward through a custom autograd function); on CUDA a real one is
forced with a large allocation."""
import warnings

import pytest
import torch

from trainloop_nb.core import Callback
from trainloop_nb.data import TrainingEpochs, ValidationBatches
from trainloop_nb.loop import TrainingLoop
from trainloop_nb.oom import check_on_oom
from trainloop_nb.checkpoint_io import CheckpointError

FEATURES, CLASSES = 10, 3


def data(samples=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, FEATURES, generator=g)
    return x, (x[:, :CLASSES] * torch.tensor([1.0, -1.0, 0.5])).argmax(dim=1)


class OutOfMemoryAbove(torch.autograd.Function):
    "The identity, whose backward runs out of memory for more than `limit` samples."
    @staticmethod
    def forward(ctx, x, limit):
        ctx.limit = limit
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if grad.shape[0] > ctx.limit:
            raise torch.OutOfMemoryError(f"out of memory in backward ({grad.shape[0]} samples)")
        return grad, None


class SmallDevice(torch.nn.Module):
    """An MLP that holds at most `limit` samples in training: above it, `torch.OutOfMemoryError` in the forward pass
    (`where="forward"`) or half-way through backward, after the last layer's gradients are in (`where="backward"`)."""
    def __init__(self, limit=1000, where="forward", dropout=0.0):
        super().__init__()
        self.limit, self.where = limit, where
        self.first = torch.nn.Sequential(torch.nn.Linear(FEATURES, 32), torch.nn.ReLU(), torch.nn.Dropout(dropout))
        self.last = torch.nn.Linear(32, CLASSES)

    def forward(self, x):
        if isinstance(x, dict): x = x["x"] * x["scale"]  # a mapping batch
        hidden = self.first(x)  # draws the dropout masks before running out: a retry must draw them again
        if self.training and self.where == "forward" and x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated: {x.shape[0]} samples, {self.limit} fit)")
        if self.training and self.where == "backward": hidden = OutOfMemoryAbove.apply(hidden, self.limit)
        return self.last(hidden)


def run(limit=1000, where="forward", on_oom="split", epochs=2, training=None, callbacks=(), accumulate_steps=1,
        precision="32", dropout=0.0, batch_size=32):
    torch.manual_seed(0)
    model = SmallDevice(limit, where, dropout)
    x, y = data()
    training = TrainingEpochs((x[:192], y[:192]), batch_size=batch_size, seed=1) if training is None else training
    loop = TrainingLoop(training, ValidationBatches((x[192:], y[192:]), 64),
                        torch.optim.SGD(model.parameters(), lr=0.1), metrics=["accuracy"], callbacks=list(callbacks),
                        include_default_callbacks=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warnings that the split grew: tested on their own below
        loop.fit(model, epochs, "cpu", on_oom=on_oom, accumulate_steps=accumulate_steps, precision=precision)
    return loop, model


def assert_same_run(split, whole, atol=1e-6, rtol=1e-5):
    (split_loop, split_model), (whole_loop, whole_model) = split, whole
    for a, b in zip(split_model.state_dict().values(), whole_model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)  # the sums run in another order: not bitwise
    assert len(split_loop.history) == len(whole_loop.history)
    for s, w in zip(split_loop.history, whole_loop.history):
        assert s.keys() == w.keys()
        assert {k: pytest.approx(v, rel=rtol, abs=atol) for k, v in s.items() if k != "time"} == \
            {k: v for k, v in w.items() if k != "time"}


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_a_split_fit_trains_as_one_whose_batches_fit(where):
    split = run(limit=8, where=where)
    assert split[0].micro_batches == 4  # 32 samples: 2 parts of 16 ran out too, 4 of 8 fit
    assert_same_run(split, run(limit=1000, on_oom="raise"))


def test_the_split_grows_with_a_warning_and_is_kept_for_later_batches():
    torch.manual_seed(0)
    x, y = data()
    model = SmallDevice(limit=10)
    loop = TrainingLoop(TrainingEpochs((x, y), batch_size=32), optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                        include_default_callbacks=False)
    with pytest.warns(UserWarning) as caught: loop.fit(model, 1, "cpu", on_oom="split")
    assert [str(w.message).split(": ")[1].split(" micro")[0] for w in caught] == \
        ["it and the later batches now run as 2", "it and the later batches now run as 4"]
    assert "(epoch 1, batch 1)" in str(caught[0].message) and "up to 8 samples" in str(caught[1].message)
    assert loop.micro_batches == 4


def test_callbacks_and_metrics_see_the_whole_batch_and_one_step():
    class Seen(Callback):
        def __init__(self): self.updates, self.batches = [], []
        def update_start(self, loop): self.updates.append((loop.step, loop.last_step_output.shape[0]))
        def batch_end(self, loop):
            if loop.phase == "training": self.batches.append((loop.step, loop.last_step_loss.item()))
    seen = Seen()
    loop, _ = run(limit=8, epochs=1, callbacks=[seen])
    assert seen.updates == [(step, 32) for step in range(6)]  # 192 samples: 6 batches, one update and step each
    assert [step for step, _ in seen.batches] == list(range(1, 7)) and loop.step == 6
    whole_seen = Seen()
    run(limit=1000, epochs=1, callbacks=[whole_seen])
    assert [loss for _, loss in seen.batches] == pytest.approx([loss for _, loss in whole_seen.batches], rel=1e-5)


def test_mapping_batches_are_split_generically():
    x, y = data()
    batches = [({"x": x[i:i + 24], "scale": 2.0}, y[i:i + 24]) for i in range(0, 192, 24)]
    split = run(limit=5, training=batches)
    assert split[0].micro_batches == 8  # 24 samples: parts of 12, 6 ran out; 8 parts of 3 fit
    assert_same_run(split, run(limit=1000, on_oom="raise", training=batches))


def test_accumulated_batches_keep_the_groups_gradients_through_an_oom_in_backward():
    # Batches of 8, 8, 16, 8, 16, 8, 8 samples in groups of 3: the third batch, last of its group, runs out of memory
    # in backward after the last layer's gradient was added to the group's; the last group is one batch long.
    x, y = data()
    sizes, starts = [8, 8, 16, 8, 16, 8, 8], [0, 8, 16, 32, 40, 56, 64]
    batches = [(x[s:s + n], y[s:s + n]) for s, n in zip(starts, sizes)]
    split = run(limit=8, where="backward", training=batches, accumulate_steps=3)
    assert split[0].micro_batches == 2 and split[0].step == 2 * 3
    assert_same_run(split, run(limit=1000, on_oom="raise", training=batches, accumulate_steps=3))


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_combines(precision):
    try: split = run(limit=8, where="backward", precision=precision, accumulate_steps=2)
    except ValueError as error:
        if "cannot run on cpu" in str(error) or "needs autocast" in str(error): pytest.skip(str(error))
        raise
    assert split[0].micro_batches == 4
    whole = run(limit=1000, on_oom="raise", precision=precision, accumulate_steps=2)
    assert_same_run(split, whole, atol=1e-2, rtol=1e-2)  # float16 and bfloat16 products, summed in another order


def test_a_batch_that_does_not_fit_one_sample_raises_the_oom_with_a_note():
    torch.manual_seed(0)
    model = SmallDevice(limit=0)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = data()
    loop = TrainingLoop(TrainingEpochs((x, y), batch_size=4), optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                        include_default_callbacks=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(torch.OutOfMemoryError) as raised: loop.fit(model, 1, "cpu", on_oom="split")
    notes = "\n".join(raised.value.__notes__)
    assert "ran this batch of 4 samples in micro-batches of one sample, and one still did not fit" in notes
    assert "in epoch 1, training batch 1 (after step 0)" in notes
    assert loop.micro_batches == 4 and loop.step == 0
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))


def test_with_raise_the_default_an_oom_stops_the_fit():
    with pytest.raises(torch.OutOfMemoryError): run(limit=8, on_oom="raise")
    with pytest.raises(torch.OutOfMemoryError): run(limit=0, on_oom="split", batch_size=1)  # nothing to split


def test_bad_on_oom_is_refused_before_anything_runs():
    with pytest.raises(ValueError, match="on_oom must be 'raise' .* or 'split'"): run(on_oom="retry")
    with pytest.raises(ValueError, match="runs on one process, and this fit runs on 2"): check_on_oom("split", 2)


class StopAtStep(Callback):
    def __init__(self, step): self.step, self.fired = step, False
    def update_start(self, loop):
        if loop.step == self.step and not self.fired:
            self.fired = True
            raise KeyboardInterrupt


def test_on_oom_is_in_the_run_state_and_a_resumed_split_run_repeats_itself():
    uninterrupted, uninterrupted_model = run(limit=8, dropout=0.5, epochs=3)
    torch.manual_seed(0)
    model = SmallDevice(limit=8, dropout=0.5)
    x, y = data()
    loop = TrainingLoop(TrainingEpochs((x[:192], y[:192]), batch_size=32, seed=1),
                        ValidationBatches((x[192:], y[192:]), 64), torch.optim.SGD(model.parameters(), lr=0.1),
                        metrics=["accuracy"], callbacks=[StopAtStep(8)], include_default_callbacks=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(KeyboardInterrupt): loop.fit(model, 3, "cpu", on_oom="split")
        assert loop.state_dict()["options"]["on_oom"] == "split"
        history = loop.resume()  # starts again at one part: runs out of memory, and draws the same dropout masks
    assert loop.on_oom == "split" and loop.micro_batches == 4
    for a, b in zip(model.state_dict().values(), uninterrupted_model.state_dict().values()): assert torch.equal(a, b)
    assert [{k: v for k, v in h.items() if k != "time"} for h in history] == \
        [{k: v for k, v in h.items() if k != "time"} for h in uninterrupted.history]


def test_a_run_may_resume_with_another_on_oom():
    stopped, model = run(limit=1000, on_oom="raise", epochs=1)
    state = stopped.state_dict()
    assert state["options"]["on_oom"] == "raise"
    try: stopped.fit(model, 2, "cpu", resume_from=state, on_oom="split")
    except CheckpointError as error: pytest.fail(f"on_oom is free to change on a resume: {error}")
    assert stopped.on_oom == "split" and len(stopped.history) == 2


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device: a real torch.OutOfMemoryError is forced there with large "
                                       "allocations (benchmarks/cuda_oom_check.py does the same as a script)")


class Hungry(torch.nn.Module):
    "A linear model whose training forward holds two buffers of `per_sample` bytes a sample (none if it is 0)."
    def __init__(self, per_sample):
        super().__init__()
        self.net, self.per_sample = torch.nn.Linear(FEATURES, CLASSES), per_sample

    def forward(self, x):
        if not (self.training and self.per_sample): return self.net(x)
        first = torch.empty(x.shape[0] * self.per_sample, dtype=torch.uint8, device=x.device)
        second = torch.empty(x.shape[0] * self.per_sample, dtype=torch.uint8, device=x.device)  # runs out first
        return self.net(x) + (first[:1].float() + second[:1].float()).nan_to_num() * 0


def cuda_run(per_sample, batch_size=32):
    torch.manual_seed(0)
    model = Hungry(per_sample)
    x, y = data()
    loop = TrainingLoop(TrainingEpochs((x[:192], y[:192]), batch_size=batch_size, seed=1), None,
                        torch.optim.SGD(model.parameters(), lr=0.1), include_default_callbacks=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loop.fit(model, 1, "cuda", on_oom="split")
    return loop, model


def free_cuda_memory() -> int:
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()[0]


@needs_cuda
def test_a_real_cuda_oom_frees_the_failed_try_and_splits():
    allocated = torch.cuda.memory_allocated()
    per_sample = int(free_cuda_memory() * 0.8) // 48  # 32 samples: a buffer is 0.53 of 80% of the free memory
    split, split_model = cuda_run(per_sample)
    # The failed try's first buffer was freed: 2 parts of 16 fit only without it (held, they would need 4 or more).
    assert split.micro_batches == 2
    assert torch.cuda.memory_allocated() - allocated < 1 << 20
    whole, whole_model = cuda_run(0)
    assert whole.micro_batches == 1
    for a, b in zip(split_model.parameters(), whole_model.parameters()): torch.testing.assert_close(a, b)


@needs_cuda
def test_a_real_cuda_oom_at_one_sample_raises_and_holds_no_device_memory():
    allocated = torch.cuda.memory_allocated()
    per_sample = int(free_cuda_memory() * 0.6)  # one sample's first buffer fits, its second does not
    with pytest.raises(torch.OutOfMemoryError) as raised: cuda_run(per_sample, batch_size=4)
    assert "micro-batches of one sample" in "\n".join(raised.value.__notes__)
    # The error (and its traceback) is still held here, as a notebook holds the last one: not the failed try's tensors.
    assert torch.cuda.memory_allocated() - allocated < 1 << 20
