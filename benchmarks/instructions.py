"""The loop's cost counted in machine instructions, which a shared machine cannot blur.

benchmarks/step_cost.py and benchmarks/peers.py time the loop against plain PyTorch; on a shared machine their
figures swing by more than what they measure. This counts instead, running the same fits under valgrind's
callgrind, each fit inside a C function of its own (`itertools.starmap`) so that callgrind counts and dumps it
alone. Each contender runs a short and a long fit; the difference is what the extra work costs, set-up and first
calls cancelled. The counts repeat to within about a thousand instructions a step from run to run.

Two jobs:
  step     (default) benchmarks/step_cost.py's comparison: Linear(4, 2), batch 4, `TrainingEpochs`, SGD, one
           thread; the hand loop and `TrainingLoop` with its defaults, then without the progress printer (no default
           callback), then without the non-finite-loss watch too (`stop_on_nonfinite=False`); then both keeping
           the mean loss only (no accuracy: the loop's own work, the events, checks and bookkeeping, without
           what its metrics save); fits of 100 and 100 + --steps steps, so instructions per step.
  --peers  benchmarks/peers.py's two targets: `TrainingLoop` over a DataLoader against the plain loop computing
           the same training metrics, and over `TrainingEpochs` against indexing tensors by hand (MLP 784-128-10,
           80 + 20 batches of 128); fits of 1 and 2 epochs, so instructions per epoch, and their ratios.

Under valgrind a step takes ~50x longer, so work that runs on the clock (the progress bar redraws every 0.2 s and
reads the loss every 0.5 s) would run ~50x more often than natively. The child process therefore slows
`time.time` and `time.monotonic` by the slowdown it measures itself (its hand-loop step against the parent's native
one), keeping that work at its native rate.

Instructions are not time: Python's interpreter and torch's kernels do not retire the same instructions per cycle.
The µs column converts at the hand loop's own rate (its native µs per step over its instructions per step), an
estimate that holds where the extra work is like the hand loop's: dispatch and Python.

    .venv/bin/python benchmarks/instructions.py [--steps 500] [--every-callback] [--peers]

Needs valgrind (`apt-get install valgrind`). On the 2-core development machine the step job takes about 7
minutes (2 of them torch's import under valgrind), --peers about 45 (an MLP's matrix products, simulated).
"""
import argparse
import contextlib
import functools
import glob
import itertools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402

import peers  # noqa: E402
import step_cost  # noqa: E402
from trainloop_nb.data import TrainingEpochs  # noqa: E402

SHORT = 100  # steps of the short fit of the step job; the long one has SHORT + --steps


def variants(folder: str, every_callback: bool) -> dict:
    found = {"hand": step_cost.hand_loop, "defaults": step_cost.loop_fit,
             "no printer": functools.partial(step_cost.loop_fit, printer=False),  # no default callback
             "no printer/watch": functools.partial(step_cost.loop_fit, printer=False, stop_on_nonfinite=False),
             # the loop's own work alone: both keep the mean loss only, the loop without printer and watch
             "hand, loss only": functools.partial(step_cost.hand_loop, accuracy=False),
             "loop, loss only": functools.partial(step_cost.loop_fit, printer=False, stop_on_nonfinite=False, metrics=())}
    if every_callback:
        makers = step_cost.callback_makers(folder)
        found["every callback"] = lambda m, d, e, stamps: step_cost.loop_fit(m, d, e, makers.values(), stamps)
    return found


def data_of(steps: int) -> TrainingEpochs:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(steps * 4, 4, generator=g)
    y = (x[:, 0] + 0.5 * torch.randn(len(x), generator=g) > 0).long()
    return TrainingEpochs((x, y), batch_size=4, seed=0)


def fit(run, data: TrainingEpochs) -> list[float]:
    "One fit of the step job from the same seed; the clock at the end of each of its steps (every variant stamps it)."
    torch.manual_seed(0)
    data.set_epoch(0)
    stamps = []
    run(torch.nn.Linear(4, 2), data, 1, stamps=stamps)
    return stamps


def median_step_us(stamps: list[float]) -> float:
    return 1e6 * statistics.median(b - a for a, b in zip(stamps[5:], stamps[6:]))  # the first steps pay first calls


def slowed_clocks(factor: float) -> None:
    "`time.time` and `time.monotonic` run `factor` times slower from now on (this process only)."
    real_time, real_monotonic = time.time, time.monotonic
    t0, m0 = real_time(), real_monotonic()
    time.time = lambda: t0 + (real_time() - t0) / factor
    time.monotonic = lambda: m0 + (real_monotonic() - m0) / factor


def steps_of_fit(run, data: TrainingEpochs) -> int: return len(fit(run, data))


def epochs_of_fit(contender, tensors, epochs: int) -> int:
    contender(tensors, epochs)
    return epochs


def fits(job: str, names: list[str], steps: int, folder: str, every_callback: bool) -> dict:
    "name -> (short fit, long fit), each a call that runs it and returns what it did: steps stamped, or epochs."
    if job == "peers":
        tensors = peers.make_tensors()
        return {name: tuple(functools.partial(epochs_of_fit, peers.CONTENDERS[name][1], tensors, n) for n in (1, 2))
                for name in names}
    short, long = data_of(SHORT), data_of(SHORT + steps)
    runs = variants(folder, every_callback)
    return {name: tuple(functools.partial(steps_of_fit, runs[name], data) for data in (short, long)) for name in names}


def child(job: str, names: list[str], steps: int, native_hand_us: float, every_callback: bool) -> list[tuple[str, int]]:
    """Under callgrind: each contender's short and long fit, each inside `itertools.starmap` (collected and dumped
    alone). Returns the contender and what each counted fit did (steps stamped, or epochs)."""
    torch.set_num_threads(1)
    counted = []
    with tempfile.TemporaryDirectory() as folder, open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        todo = fits(job, names, steps, folder, every_callback)
        for short, _ in todo.values(): short()  # first calls, outside the counts
        if job == "step":
            slowed_clocks(max(1.0, median_step_us(fit(step_cost.hand_loop, data_of(SHORT))) / native_hand_us))
        for name in names:
            for run in todo[name]: counted.append((name, list(itertools.starmap(run, [()]))[0]))
    return counted


def dump_totals(prefix: str) -> list[int]:
    "Instructions of each dump callgrind wrote (one per starmap call that ran a fit), in order."
    totals = []
    for path in sorted(glob.glob(prefix + ".*"), key=lambda p: int(p.rsplit(".", 1)[1])):
        with open(path) as f:
            total = next(int(line.split()[1]) for line in f if line.startswith(("summary:", "totals:")))
        if total > 10**6: totals.append(total)  # starmap's last call, which only ends the iteration, is left out
    return totals


def counted_under_valgrind(job: str, names: list[str], steps: int, native_hand_us: float, every_callback: bool) -> list[int]:
    with tempfile.TemporaryDirectory() as out:
        prefix = os.path.join(out, "callgrind.out")
        command = ["valgrind", "--tool=callgrind", "--collect-atstart=no", "--toggle-collect=starmap_next",
                   "--dump-after=starmap_next", f"--callgrind-out-file={prefix}", sys.executable, __file__,
                   "--steps", str(steps), "--child", f"{job}:{'|'.join(names)}:{native_hand_us}"]
        if every_callback: command.append("--every-callback")
        done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
        if done.returncode: sys.exit(f"valgrind failed ({done.returncode}):\n{done.stderr[-3000:]}")
        totals = dump_totals(prefix)
    if len(totals) != 2 * len(names): sys.exit(f"expected {2 * len(names)} fits counted, found {len(totals)}: {totals}")
    return totals


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=500, help="step job: extra steps of the long fit over the short one")
    p.add_argument("--every-callback", action="store_true", help="step job: also TrainingLoop with every built-in callback")
    p.add_argument("--peers", action="store_true", help="count benchmarks/peers.py's two targets instead")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        job, names, native = args.child.split(":")
        child(job, names.split("|"), args.steps, float(native), args.every_callback)
        return
    if shutil.which("valgrind") is None: sys.exit("valgrind is not installed: apt-get install valgrind")
    torch.set_num_threads(1)
    if args.peers:
        names = peers.target_contenders()
        totals = counted_under_valgrind("peers", names, args.steps, 0.0, False)
        per_epoch = {name: totals[2 * i + 1] - totals[2 * i] for i, name in enumerate(names)}
        print(f"benchmarks/peers.py's job (MLP 784-128-10, {peers.TRAIN_BATCHES} + {peers.VALID_BATCHES} batches of "
              f"{peers.BATCH}, SGD, one thread); instructions per epoch from fits of 1 and 2 epochs under callgrind; "
              f"torch {torch.__version__}")
        for name, count in per_epoch.items(): print(f"{peers.CONTENDERS[name][0]:<32} {count:16,d}")
        for name, reference, target in peers.TARGETS:
            print(f"{peers.CONTENDERS[name][0]} / {peers.CONTENDERS[reference][0]}: "
                  f"{per_epoch[name] / per_epoch[reference]:.4f} (target {target})")
        return
    with tempfile.TemporaryDirectory() as folder:
        names = list(variants(folder, args.every_callback))
    data = data_of(SHORT + args.steps)
    hand_us = statistics.median(median_step_us(fit(step_cost.hand_loop, data)) for _ in range(5))  # natively: the rate to convert at
    totals = counted_under_valgrind("step", names, args.steps, hand_us, args.every_callback)
    per_step = {name: (totals[2 * i + 1] - totals[2 * i]) / args.steps for i, name in enumerate(names)}
    reference = {name: per_step["hand, loss only" if "loss only" in name else "hand"] for name in names}
    hand = per_step["hand"]
    print(f"Linear(4, 2), batch 4, TrainingEpochs, SGD, one thread; instructions per step from fits of {SHORT} and "
          f"{SHORT + args.steps} steps under callgrind; torch {torch.__version__}")
    print(f"hand loop natively: {hand_us:.1f} µs a step (median of 5 fits), so {1e3 * hand_us / hand:.3f} ns an instruction")
    print("each variant against the hand loop that computes the same metrics (the loss-only pair against each other)")
    print(f"{'variant':<18} {'instructions/step':>18} {'- hand':>9} {'% of hand':>10} {'≈ µs at the hand rate':>22}")
    for name, count in per_step.items():
        extra = count - reference[name]
        print(f"{name:<18} {count:18.0f} {extra:+9.0f} {100 * extra / reference[name]:+9.2f}% {extra * hand_us / hand:+22.1f}")


if __name__ == "__main__":
    main()
