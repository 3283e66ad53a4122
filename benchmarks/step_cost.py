"""The loop's fixed cost per training step: TrainingLoop against a hand-written loop on a model so small that
the loop's own Python is what shows.

Linear(4, 2), batch 4, `TrainingEpochs`, SGD, on the CPU with one thread. The hand-written loop computes
the same metrics the same way the loop does: the sample-weighted loss sum and the count of correct
predictions, kept on the device and read once per epoch. So the difference is the loop's own cost:
dispatch, the batch split and move, metric bookkeeping, and what the callbacks do at each event.

Variants, run in turn (the order rotates every repeat, so drift in the machine's speed hits all alike):
  hand      the hand-written loop
  defaults  TrainingLoop with its default callbacks (the progress printer in terminal mode, bars
            written to /dev/null: the costlier of the script modes)
  all       the same with every built-in callback attached: LiveLossPlot (console), CSVLogger,
            TensorBoardLogger, LearningRateScheduler and CallbackInspector
  --each    adds one run per built-in callback alone (on top of the defaults)
Prints µs per step of each (median over repeats) and the median of the per-repeat differences to the hand
loop, by wall time and by this process's CPU time (on a shared machine the CPU time is the steadier one),
and the 10th percentile of the single steps' times (every variant stamps the clock once per step): a step
that nothing else interrupted, the steadiest figure of the three when other processes share the CPU.
The final weights of every variant must equal the hand loop's bitwise: the same arithmetic ran.

    .venv/bin/python benchmarks/step_cost.py [--steps 20000] [--repeats 5] [--each]
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


def hand_loop(model, data, epochs, stamps=None):
    "What a careful PyTorch user writes, with the loop's metrics (loss sum, correct count) on the device."
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
            correct.add_((output.detach().argmax(dim=-1) == y).sum())
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


def loop_fit(model, data, epochs, extra=(), stamps=None):
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    callbacks = [ProgressPrinter(mode="terminal")] + [make() for make in extra] + [Stamp([] if stamps is None else stamps)]
    loop = TrainingLoop(data, None, optimizer, metrics=["accuracy"], callbacks=callbacks)
    loop.fit(model, epochs=epochs, device="cpu")


def timed(run, data, epochs, steps):
    "One fit from the same seed: (µs per step by wall time, by CPU time, 10th percentile of single steps, final weights)."
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    data.set_epoch(0)
    stamps = []
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        wall, cpu = time.perf_counter(), time.process_time()
        run(model, data, epochs, stamps=stamps)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    single = sorted(b - a for a, b in zip(stamps, stamps[1:]))
    return (1e6 * wall / steps, 1e6 * cpu / steps, 1e6 * single[len(single) // 10],
            [p.detach().clone() for p in model.parameters()])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20_000, help="training steps per fit (5 epochs)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--each", action="store_true", help="also time each built-in callback alone")
    args = p.parse_args()
    torch.set_num_threads(1)
    epochs, batch_size = 5, 4
    per_epoch = args.steps // epochs
    g = torch.Generator().manual_seed(0)
    x = torch.randn(per_epoch * batch_size, 4, generator=g)
    y = (x[:, 0] + 0.5 * torch.randn(len(x), generator=g) > 0).long()
    data = TrainingEpochs((x, y), batch_size=batch_size, seed=0)
    steps = per_epoch * epochs

    with tempfile.TemporaryDirectory() as folder:
        makers = callback_makers(folder)
        variants = {"hand": hand_loop, "defaults": loop_fit,
                    "all": lambda m, d, e, stamps: loop_fit(m, d, e, makers.values(), stamps)}
        if args.each:
            for name, make in makers.items():
                variants[f"+{name}"] = lambda m, d, e, stamps, make=make: loop_fit(m, d, e, [make], stamps)
        names = list(variants)
        for name in names: timed(variants[name], data, 1, per_epoch)  # warm-up: first calls, allocator, imports
        results = {name: [] for name in names}
        for r in range(args.repeats):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order: results[name].append(timed(variants[name], data, epochs, steps))
            line = "  ".join(f"{n} {results[n][-1][1]:6.1f}" for n in names)
            print(f"repeat {r + 1}: CPU µs/step  {line}", flush=True)

    reference = results["hand"][-1][3]
    print(f"\nLinear(4, 2), batch {batch_size}, {per_epoch} steps/epoch x {epochs} epochs, {args.repeats} rotating "
          f"repeats, torch {torch.__version__}, {torch.get_num_threads()} thread, CPU")
    print(f"{'variant':<24} {'wall µs/step':>13} {'- hand':>8}   {'CPU µs/step':>12} {'- hand':>8}   "
          f"{'p10 step µs':>12} {'- hand':>8}   weights = hand")
    for name in names:
        row, hand = results[name], results["hand"]
        medians = [statistics.median(r[i] for r in row) for i in range(3)]
        differences = [statistics.median(r[i] - h[i] for r, h in zip(row, hand)) for i in range(3)]
        same = all(torch.equal(a, b) for a, b in zip(row[-1][3], reference))
        print(f"{name:<24} " + "   ".join(f"{m:{w}.1f} {d:+8.1f}" for m, d, w in zip(medians, differences, (13, 12, 12)))
              + f"   {same}")


if __name__ == "__main__":
    main()
