"""What one checkpoint costs: `save_checkpoint` of a model with its Adam state, against a plain `torch.save`.

Two models: the demo's LeNet (8x8 digits, about 60k parameters) and a ~25M-parameter MLP
(1024-4096-4096-1024). Each gets one Adam step so its optimizer state (two moments per parameter)
exists, as in a real run. For each, the median over `--repeats` of:

- `torch.save`: a plain `torch.save` of the same dict to a file (no fsync), the floor;
- `save_checkpoint`: ours (SHA-256 as the bytes stream out, fsync of the file, rename, fsync of the folder);
- `load_checkpoint`: ours (checksum read, then `torch.load(weights_only=True)`);
- and the file size.

Files go to `--directory` (default: a temporary folder); fsync costs depend on the disk below it,
so measure where the checkpoints of a real run would go.

    .venv/bin/python benchmarks/checkpoint_cost.py [--repeats 5] [--directory run/bench] [--device cpu]
"""
import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from trainloop_nb.callbacks.checkpoint import load_checkpoint, save_checkpoint
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--directory", default=None)
    parser.add_argument("--device", default="cpu")
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


if __name__ == "__main__":
    main()
