"""What one checkpoint costs: `save_checkpoint` of a model with its Adam state, against a plain `torch.save`.

Two models: the demo's LeNet (8x8 digits, about 60k parameters) and a ~25M-parameter MLP
(1024-4096-4096-1024). Each gets one Adam step so its optimizer state (two moments per parameter)
exists, as in a real run. For each, the median over `--repeats` of:

- `torch.save`: a plain `torch.save` of the same dict to a file (no fsync), the floor;
- `save_checkpoint`: ours (SHA-256 as the bytes stream out, fsync of the file, rename, fsync of the folder);
- `load_checkpoint`: ours (checksum read, then `torch.load(weights_only=True)`);
- and the file size.

Then the cost in a fit: the demo's run (LeNet on the scikit-learn digits, Adam, batch 64, 22 steps an epoch)
trained with `Checkpoint(every_steps=100, every_epochs=None)` and without, alternating, `--fit-repeats` times
each; steps per second (median) of each and the ratio. The fit runs with `--threads` torch threads (default 1):
on a shared machine, more threads than free cores make the timing mostly thread contention.

Files go to `--directory` (default: a temporary folder); fsync costs depend on the disk below it,
so measure where the checkpoints of a real run would go.

    .venv/bin/python benchmarks/checkpoint_cost.py [--repeats 5] [--directory run/bench] [--device cpu]
                                                   [--fit-epochs 20] [--fit-repeats 5] [--threads 1]
"""
import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from trainloop_nb.callbacks.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from trainloop_nb.data import Digits
from trainloop_nb.loop import TrainingLoop
from trainloop_nb.models import MLP, LeNet


def with_adam_state(model, example, device):
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(example.to(device)).sum().backward()
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 1}


def median_seconds(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fit_seconds(directory, epochs, device, checkpoint):
    "Wall time of the demo's fit, with a checkpoint every 100 steps or none; and its number of steps."
    torch.manual_seed(0)
    data = Digits(batch_size=64, seed=0)
    model = LeNet(in_channels=1, num_classes=10, image_size=8)
    callbacks = [Checkpoint(directory, every_steps=100, every_epochs=None, keep_last=2)] if checkpoint else []
    loop = TrainingLoop(data.training, data.validation, torch.optim.Adam(model.parameters(), lr=3e-3),
                        metrics=["accuracy"], callbacks=callbacks, include_default_callbacks=False)
    start = time.perf_counter()
    loop.fit(model, epochs=epochs, device=device)
    seconds = time.perf_counter() - start
    for path in directory.glob("step-*.pt"): path.unlink()
    return seconds, loop.step


def fit_cost(directory, epochs, repeats, device):
    "Steps per second of the demo's fit with and without checkpoints, alternating runs; medians and their ratio."
    times = {False: [], True: []}
    for _ in range(repeats):
        for checkpoint in (False, True):
            seconds, steps = fit_seconds(directory / "fit_checkpoints", epochs, device, checkpoint)
            times[checkpoint].append(seconds)
    none, every_100 = (steps / statistics.median(times[c]) for c in (False, True))
    print(f"\ndemo fit, {epochs} epochs = {steps} steps, median of {repeats} alternating runs:")
    print(f"  no checkpoint                  {none:8.1f} steps/s")
    print(f"  Checkpoint(every_steps=100)    {every_100:8.1f} steps/s   ratio {every_100 / none:.3f} "
          f"({steps // 100} checkpoints per fit)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--directory", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--fit-epochs", type=int, default=20)
    parser.add_argument("--fit-repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the fit (default 1)")
    args = parser.parse_args()
    directory = Path(args.directory or tempfile.mkdtemp(prefix="checkpoint_cost_"))
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cases = {
        "LeNet (demo)": (LeNet(in_channels=1, num_classes=10, image_size=8), torch.randn(64, 1, 8, 8)),
        "MLP 1024-4096-4096-1024": (MLP([1024, 4096, 4096, 1024]), torch.randn(64, 1024)),
    }
    print(f"device {args.device}, files in {directory}, median of {args.repeats}")
    print(f"{'model':<26}{'parameters':>12}{'file MB':>10}{'torch.save s':>14}{'save_checkpoint s':>19}{'load_checkpoint s':>19}")
    for name, (model, example) in cases.items():
        parameters = sum(p.numel() for p in model.parameters())
        state = with_adam_state(model, example, args.device)
        plain, ours = directory / "plain.pt", directory / "step-00000001.pt"
        plain_s = median_seconds(lambda: torch.save(state, plain), args.repeats)
        save_s = median_seconds(lambda: save_checkpoint(state, ours), args.repeats)
        load_s = median_seconds(lambda: load_checkpoint(ours), args.repeats)
        size_mb = os.path.getsize(ours) / 1e6
        print(f"{name:<26}{parameters:>12,}{size_mb:>10.1f}{plain_s:>14.4f}{save_s:>19.4f}{load_s:>19.4f}")
        plain.unlink()
        ours.unlink()
    torch.set_num_threads(args.threads)
    fit_cost(directory, args.fit_epochs, args.fit_repeats, args.device)


if __name__ == "__main__":
    main()
