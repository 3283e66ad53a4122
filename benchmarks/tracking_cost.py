"""What `MLflowLogger` costs a fit: the demo's run with the logger and without, alternating.

The demo's run (LeNet on the scikit-learn digits, Adam, batch 64, 23 steps an epoch), `--epochs` epochs,
trained `--repeats` times with `MLflowLogger` (a SQLite database in `--directory`, per-step values on,
the default half-second flush) and `--repeats` times without, in turn; the first fit of each kind is a
warm-up (the database's tables are made then) and not counted. Prints the median seconds per fit of each
and the ratio with / without, with its range over the pairs. Runs with `--threads` torch threads (default 1):
on a shared machine, more threads than free cores make the timing mostly thread contention.

    .venv/bin/python benchmarks/tracking_cost.py [--epochs 4] [--repeats 5] [--directory run/bench] [--threads 1]
"""
import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from trainloop_nb.callbacks.tracking import MLflowLogger
from trainloop_nb.data import Digits
from trainloop_nb.loop import TrainingLoop
from trainloop_nb.models import LeNet


def fit_seconds(database: Path, epochs: int, tracked: bool) -> tuple[float, int]:
    "Wall time of the demo's fit, logged to MLflow or not; and its number of steps."
    torch.manual_seed(0)
    data = Digits(batch_size=64, seed=0)
    model = LeNet(in_channels=1, num_classes=10, image_size=8)
    callbacks = [MLflowLogger(database, experiment="tracking_cost")] if tracked else []
    loop = TrainingLoop(data.training, data.validation, torch.optim.Adam(model.parameters(), lr=3e-3),
                        metrics=["accuracy"], callbacks=callbacks, include_default_callbacks=False)
    start = time.perf_counter()
    loop.fit(model, epochs=epochs, device="cpu")
    return time.perf_counter() - start, loop.step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--directory", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    directory = args.directory or Path(tempfile.mkdtemp())
    database = directory / "mlflow.db"
    import mlflow  # noqa: F401  (it sets its own log levels when imported)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    for tracked in (True, False): fit_seconds(database, args.epochs, tracked)  # warm-up: tables, imports, caches
    without, with_logger = [], []
    for _ in range(args.repeats):
        seconds, steps = fit_seconds(database, args.epochs, False)
        without.append(seconds)
        with_logger.append(fit_seconds(database, args.epochs, True)[0])
    ratios = [w / o for w, o in zip(with_logger, without)]
    print(f"demo fit, {args.epochs} epochs ({steps} steps), {args.repeats} pairs, {args.threads} thread(s), "
          f"database {database}")
    print(f"without MLflowLogger: {statistics.median(without):.3f} s (median)")
    print(f"with MLflowLogger:    {statistics.median(with_logger):.3f} s (median)")
    print(f"ratio with / without: {statistics.median(ratios):.3f} (median of pairs; min {min(ratios):.3f}, "
          f"max {max(ratios):.3f})")


if __name__ == "__main__":
    main()
