"""The loop's fixed cost per training step: TrainingLoop against a hand-written loop on a model so small that
the loop's own Python is what shows.

Linear(4, 2), batch 4, `TrainingEpochs`, SGD, on the CPU with one thread. The hand-written loop computes
the same metrics the same way the loop does: the sample-weighted loss sum and the count of correct
predictions, kept on the device and read once per epoch. So the difference is the loop's own cost:
dispatch, the batch split and move, metric bookkeeping, and what the callbacks do at each event.

Variants, run in turn as short fits (one epoch of --block steps each, the order rotating every block), so
that drift in the machine's speed, which on a shared machine is larger than what is measured, hits all alike:
  hand      the hand-written loop
  defaults  TrainingLoop with its default callbacks (the progress printer in terminal mode, bars
            written to /dev/null: the costlier of the script modes)
  all       the same with every built-in callback attached: LiveLossPlot (console), CSVLogger,
            TensorBoardLogger, LearningRateScheduler and CallbackInspector
  --each    adds one run per built-in callback alone (on top of the defaults)
Every variant stamps the clock once per step (the loop from a last callback at batch_end), so each step's
time is known; the first few steps of each fit are left out (they pay the fit's first calls). Prints the
median, 10th percentile and mean of the pooled single-step times of each variant and their differences to
the hand loop (the median and the 10th percentile are the steadier figures when other processes share the
CPU), and the whole fit's time per step (set-up and the epoch's end included, so it is larger for short
fits). "paired" is the median over blocks of (the variant's median step - the hand loop's median step in the
same round of blocks): drift slower than a round cancels in it. The final weights of every fit must equal the hand loop's bitwise: the same arithmetic ran.

    .venv/bin/python benchmarks/step_cost.py [--block 400] [--blocks 50] [--each]
"""
import argparse
import contextlib
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from trainloop_nb.callbacks.charts import LiveLossPlot
from trainloop_nb.callbacks.inspector import CallbackInspector
from trainloop_nb.callbacks.logging import CSVLogger, TensorBoardLogger
from trainloop_nb.callbacks.progress import ProgressPrinter
from trainloop_nb.callbacks.schedule import LearningRateScheduler, ScheduleSegment, constant
from trainloop_nb.core import Callback
from trainloop_nb.data import TrainingEpochs
from trainloop_nb.loop import TrainingLoop

LR = 0.05


def hand_loop(model, data, epochs, stamps=None, accuracy=True):
    "What a careful PyTorch user writes, with the loop's metrics (loss sum, correct count unless `accuracy=False`) on the device."
    device = torch.device("cpu")
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    model.train()
    stamp = (stamps if stamps is not None else []).append
    for _ in range(epochs):
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        samples = 0
        for x, y in data:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad(set_to_none=True)
            output = model(x)
            loss = F.cross_entropy(output, y)
            loss.backward()
            optimizer.step()
            n = y.shape[0]
            loss_sum.add_(loss.detach(), alpha=n)
            if accuracy: correct.add_((output.detach().argmax(dim=-1) == y).sum())
            samples += n
            stamp(time.perf_counter())
        _ = loss_sum.item() / samples, correct.item() / samples  # one read per epoch, as the loop does


def callback_makers(folder):
    "Every built-in callback, each made fresh for a fit (files go under `folder`)."
    return {
        "LiveLossPlot": lambda: LiveLossPlot(mode="console"),
        "CSVLogger": lambda: CSVLogger(os.path.join(folder, "log.csv")),
        "TensorBoardLogger": lambda: TensorBoardLogger(os.path.join(folder, "tensorboard")),
        "LearningRateScheduler": lambda: LearningRateScheduler([ScheduleSegment(constant, end_rate=LR)]),
        "CallbackInspector": lambda: CallbackInspector(),
    }


class Stamp(Callback):
    "The clock at the end of each training batch, after every other callback (the hand loop stamps it too)."
    order = 10**9
    def __init__(self, stamps): self.stamps = stamps
    def batch_end(self, loop): self.stamps.append(time.perf_counter())


def loop_fit(model, data, epochs, extra=(), stamps=None, printer=True, metrics=("accuracy",), **options):
    "TrainingLoop with the progress printer (unless `printer=False`: no default callback), `extra` callbacks and `options`."
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    callbacks = ([ProgressPrinter(mode="terminal")] if printer else []) + [make() for make in extra] + [Stamp([] if stamps is None else stamps)]
    loop = TrainingLoop(data, None, optimizer, metrics=list(metrics), callbacks=callbacks, include_default_callbacks=printer, **options)
    loop.fit(model, epochs=epochs, device="cpu")


SETTLE = 5  # steps left out at the start of each block: the fit's first calls


def timed(run, data, steps):
    "One fit of one epoch from the same seed: (the single steps' times in µs, whole fit µs per step, final weights)."
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    data.set_epoch(0)
    stamps = []
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        wall = time.perf_counter()
        run(model, data, 1, stamps=stamps)
        wall = time.perf_counter() - wall
    single = [1e6 * (b - a) for a, b in zip(stamps[SETTLE:], stamps[SETTLE + 1:])]
    return single, 1e6 * wall / steps, [p.detach().clone() for p in model.parameters()]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--block", type=int, default=400, help="training steps per fit (one epoch)")
    p.add_argument("--blocks", type=int, default=50, help="fits of each variant, taken in turn")
    p.add_argument("--each", action="store_true", help="also time each built-in callback alone")
    args = p.parse_args()
    torch.set_num_threads(1)
    batch_size = 4
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.block * batch_size, 4, generator=g)
    y = (x[:, 0] + 0.5 * torch.randn(len(x), generator=g) > 0).long()
    data = TrainingEpochs((x, y), batch_size=batch_size, seed=0)

    with tempfile.TemporaryDirectory() as folder:
        makers = callback_makers(folder)
        variants = {"hand": hand_loop, "defaults": loop_fit,
                    "all": lambda m, d, e, stamps: loop_fit(m, d, e, makers.values(), stamps)}
        if args.each:
            for name, make in makers.items():
                variants[f"+{name}"] = lambda m, d, e, stamps, make=make: loop_fit(m, d, e, [make], stamps)
        names = list(variants)
        for name in names: timed(variants[name], data, args.block)  # warm-up: first calls, allocator, imports
        steps = {name: [] for name in names}
        fits = {name: [] for name in names}
        block_medians = {name: [] for name in names}
        same = dict.fromkeys(names, True)
        for b in range(args.blocks):
            for name in names[b % len(names):] + names[:b % len(names)]:
                single, fit_cost, weights = timed(variants[name], data, args.block)
                steps[name] += single
                block_medians[name].append(statistics.median(single))
                fits[name].append(fit_cost)
                if name == "hand": reference = weights
                elif b: same[name] &= all(torch.equal(a, w) for a, w in zip(reference, weights))
            if (b + 1) % 10 == 0: print(f"{b + 1} blocks of {args.block} steps done", flush=True)

    print(f"\nLinear(4, 2), batch {batch_size}, {args.blocks} fits of {args.block} steps per variant, taken in turn; "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread, CPU")
    print(f"{'variant':<24} {'median step µs':>15} {'- hand':>8}   {'p10 step µs':>12} {'- hand':>8}   "
          f"{'mean step µs':>13} {'- hand':>8}   {'paired - hand':>14}   {'whole fit µs/step':>18}   weights = hand")
    figures = {name: figures_of(steps[name]) for name in names}
    for name in names:
        cells = [f"{m:{w}.1f} {m - h:+8.1f}" for m, h, w in zip(figures[name], figures["hand"], (15, 12, 13))]
        paired = statistics.median(m - h for m, h in zip(block_medians[name], block_medians["hand"]))
        print(f"{name:<24} " + "   ".join(cells) + f"   {paired:+14.1f}   {statistics.median(fits[name]):18.1f}   {same[name]}")


def figures_of(single: list[float]) -> tuple[float, float, float]:
    "Median, 10th percentile and mean of the single steps' times."
    ordered = sorted(single)
    return ordered[len(ordered) // 2], ordered[len(ordered) // 10], sum(ordered) / len(ordered)


if __name__ == "__main__":
    main()
