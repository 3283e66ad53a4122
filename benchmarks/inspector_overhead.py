"""What adding a CallbackInspector costs a fit: TrainingLoop with its default callbacks, with and without it.

The same model, data, seed and optimizer in both runs; runs alternate (which goes first flips every
repeat) so drift in the machine's speed hits both. Prints steps per second of each, the ratio
inspected/plain (median of the per-pair ratios), and checks that the final weights are identical
(the inspector only observes). No widget is built: this is the cost of counting and timing.
Rates are given by wall-clock time and by this process's CPU time (`time.process_time`, all
threads): on a shared machine the CPU-time figure is the steadier one.

    .venv/bin/python benchmarks/inspector_overhead.py [--repeats 7] [--epochs 3] [--batch-size 128] [--device cpu]
    .venv/bin/python benchmarks/inspector_overhead.py --hidden 1   # a tiny model: the cost per step in µs
"""
import argparse
import io
import statistics
import time

import torch

from trainloop_nb.data import TrainingEpochs
from trainloop_nb.callbacks.inspector import CallbackInspector
from trainloop_nb.loop import TrainingLoop
from trainloop_nb.callbacks.progress import ProgressPrinter


def make_model(seed=0, hidden=128):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(784, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))


def fit(batches, epochs, device, inspect, hidden=128):
    "One fit from the same seed; returns ((steps per wall second, steps per CPU second), model, inspector or None)."
    model = make_model(hidden=hidden)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    inspector = CallbackInspector() if inspect else None
    callbacks = [ProgressPrinter(mode="plain", file=io.StringIO())] + ([inspector] if inspect else [])
    loop = TrainingLoop(batches, None, opt, callbacks=callbacks)
    if device.type == "cuda": torch.cuda.synchronize()
    start, cpu_start = time.perf_counter(), time.process_time()
    loop.fit(model, epochs=epochs, device=device)
    if device.type == "cuda": torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return (loop.step / wall, loop.step / cpu), model, inspector


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--samples", type=int, default=8192)
    p.add_argument("--device", default="cpu")
    p.add_argument("--hidden", type=int, default=128, help="hidden units; a tiny model (e.g. 1) exposes the per-step cost")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = p.parse_args()
    device = torch.device(args.device)
    if args.threads: torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(args.samples, 784, generator=g), torch.randint(0, 10, (args.samples,), generator=g)
    # Both runs see exactly the same batches: one epoch's batches, fixed in a list and re-used.
    batches = [(bx.to(device), by.to(device)) for bx, by in TrainingEpochs((x, y), batch_size=args.batch_size, seed=0)]

    fit(batches, 1, device, False, args.hidden); fit(batches, 1, device, True, args.hidden)  # warm-up
    rates = {"wall": ([], [], []), "cpu": ([], [], [])}  # plain rates, inspected rates, ratios
    identical = True
    for r in range(args.repeats):
        order = [False, True] if r % 2 == 0 else [True, False]
        results = {inspect: fit(batches, args.epochs, device, inspect, args.hidden) for inspect in order}
        (plain, plain_model, _), (inspected, inspected_model, inspector) = results[False], results[True]
        for i, clock in enumerate(rates):
            rates[clock][0].append(plain[i]); rates[clock][1].append(inspected[i]); rates[clock][2].append(inspected[i] / plain[i])
        same = all(torch.equal(a, b) for a, b in zip(plain_model.state_dict().values(), inspected_model.state_dict().values()))
        identical &= same
        print(f"repeat {r + 1}: wall: plain {plain[0]:7.1f} inspected {inspected[0]:7.1f} steps/s, ratio {inspected[0] / plain[0]:.3f}"
              f"   cpu: plain {plain[1]:7.1f} inspected {inspected[1]:7.1f} steps/s, ratio {inspected[1] / plain[1]:.3f}"
              f"   weights identical: {same}")
    steps = len(batches) * args.epochs
    assert inspector.counts["batch_end"] == steps, inspector.counts
    print(f"\ndevice {device}, MLP 784-{args.hidden}-10, batch {args.batch_size}, {len(batches)} steps/epoch x {args.epochs} epochs, "
          f"{args.repeats} alternating repeats, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for clock, (plain_rates, inspected_rates, ratios) in rates.items():
        extra_us = statistics.median(1e6 / i - 1e6 / p for p, i in zip(plain_rates, inspected_rates))
        print(f"{clock:>4} time: default callbacks {statistics.median(plain_rates):8.1f} steps/s, + inspector "
              f"{statistics.median(inspected_rates):8.1f} steps/s; ratio inspected/plain median {statistics.median(ratios):.3f} "
              f"(min {min(ratios):.3f}, max {max(ratios):.3f}); extra time per step median {extra_us:+.1f} µs")
    print(f"final weights identical in every repeat: {identical}")
    print("\nwhere the time went in the last inspected fit:\n" + inspector.report())


if __name__ == "__main__":
    main()
