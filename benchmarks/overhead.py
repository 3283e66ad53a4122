"""Per-step overhead of TrainingLoop against a hand-written PyTorch loop.

The same model, data, seed and optimizer are trained by both, alternating runs, several repeats.
Prints steps per second of each, the ratio loop/raw (median of the per-pair ratios), and whether
the final weights are bitwise identical to the raw loop's (they must be, on the CPU).

    .venv/bin/python benchmarks/overhead.py [--repeats 7] [--epochs 3] [--device cpu]
"""
import argparse
import io
import statistics
import time

import torch
import torch.nn.functional as F

from trainloop_nb.data import TrainingEpochs
from trainloop_nb.loop import TrainingLoop
from trainloop_nb.models import MLP
from trainloop_nb.callbacks.progress import ProgressPrinter


def make_data(samples=8192, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 784, generator=g)
    y = torch.randint(0, 10, (samples,), generator=g)
    return x, y


def make_model(seed=0):
    torch.manual_seed(seed)
    return MLP([784, 128, 10])


def raw_loop(model, batches, epochs, device):
    "The hand-written loop: what a careful PyTorch user writes, loss kept on the device for the epoch mean."
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    steps = 0
    for epoch in range(epochs):
        total = torch.zeros((), dtype=torch.float64, device=device)
        count = 0
        for x, y in batches:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            total.add_(loss.detach(), alpha=y.shape[0]); count += y.shape[0]
            steps += 1
        epoch_loss = total.item() / count  # one read per epoch, as the loop does
    return steps


def loop_fit(model, batches, epochs, device, stop_on_nonfinite=True):
    "TrainingLoop with its default callback (the progress printer, writing plain lines) and its metrics."
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loop = TrainingLoop(batches, None, opt, callbacks=[ProgressPrinter(mode="plain", file=io.StringIO())],
                        stop_on_nonfinite=stop_on_nonfinite)
    loop.fit(model, epochs=epochs, device=device)
    return loop.step


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    x, y = make_data()
    batches = TrainingEpochs((x, y), batch_size=args.batch_size, seed=0)
    # Both loops see exactly the same batches: a fixed list of the first epochs' batches, re-used.
    fixed = [(bx.to(device), by.to(device)) for bx, by in batches]

    def timed(fn):
        model = make_model()
        if device.type == "cuda": torch.cuda.synchronize()
        start = time.perf_counter()
        steps = fn(model)
        if device.type == "cuda": torch.cuda.synchronize()
        return steps / (time.perf_counter() - start), model

    # warm-up (allocator, kernels, first-call overheads)
    timed(lambda m: raw_loop(m, fixed, 1, device)); timed(lambda m: loop_fit(m, fixed, 1, device))
    raw_rates, loop_rates, ratios, unchecked_ratios, all_identical = [], [], [], [], True
    for r in range(args.repeats):
        order = [("raw", lambda m: raw_loop(m, fixed, args.epochs, device)),
                 ("loop", lambda m: loop_fit(m, fixed, args.epochs, device)),
                 ("unchecked", lambda m: loop_fit(m, fixed, args.epochs, device, stop_on_nonfinite=False))]
        order = order[r % 3:] + order[:r % 3]  # rotate which goes first
        results = {name: timed(fn) for name, fn in order}
        raw_rates.append(results["raw"][0]); loop_rates.append(results["loop"][0])
        ratios.append(results["loop"][0] / results["raw"][0])
        unchecked_ratios.append(results["unchecked"][0] / results["raw"][0])
        raw_model, loop_model = results["raw"][1], results["loop"][1]
        identical = all(torch.equal(a, b) for a, b in zip(raw_model.state_dict().values(), loop_model.state_dict().values()))
        all_identical &= identical
        print(f"repeat {r + 1}: raw {results['raw'][0]:8.1f} steps/s   loop {results['loop'][0]:8.1f} steps/s   "
              f"ratio {ratios[-1]:.3f}   (stop_on_nonfinite=False: {unchecked_ratios[-1]:.3f})   weights identical: {identical}")
    print(f"\ndevice {device}, MLP 784-128-10, batch {args.batch_size}, {len(fixed)} steps/epoch x {args.epochs} epochs, "
          f"{args.repeats} alternating repeats, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"raw loop:      median {statistics.median(raw_rates):8.1f} steps/s")
    print(f"TrainingLoop:  median {statistics.median(loop_rates):8.1f} steps/s")
    print(f"ratio loop/raw: median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})")
    print(f"ratio loop/raw with stop_on_nonfinite=False: median {statistics.median(unchecked_ratios):.3f} "
          f"(min {min(unchecked_ratios):.3f}, max {max(unchecked_ratios):.3f})")
    print(f"final weights bitwise identical to the raw loop's in every repeat: {all_identical}")


if __name__ == "__main__":
    main()
