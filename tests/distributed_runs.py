"""Runs for tests/test_distributed.py to launch under torchrun, one mode per launch (each costs seconds of start-up).

`repeat OUT`: lr_find, then fit twice, in one process group; then data the ranks disagree on (one batch fewer on
  rank 1, with and without len(); a padding DistributedSampler for validation), each caught; then a last fit.
`resume OUT`: an uninterrupted fit; the same fit stopped inside a training phase (Checkpoint(every_steps=4)); a
  fresh loop resumed from the checkpoint folder.
`nodes OUT`: as `resume`, with the checkpoints in the working folder, which differs per node (no shared disk);
  first a resume from a folder that rank 0 lacks.
Each rank writes OUT/rank<r>.json (what it saw); rank 0 writes OUT/result.pt (weights and histories).
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from toy_runs import toy_data  # the test folder is the script's folder, so sys.path has it
from trainloop_nb.callbacks.checkpoint import Checkpoint, list_checkpoints
from trainloop_nb.core import Callback
from trainloop_nb.data import TrainingEpochs, ValidationBatches
from trainloop_nb.distributed import leave_process_group
from trainloop_nb.loop import TrainingLoop

TRAIN, VALID, FEATURES, CLASSES, BATCH, VALID_BATCH = 72, 34, 6, 3, 4, 8  # 9 steps per epoch on 2 ranks
LR_STEPS = 30


def data():
    return toy_data(TRAIN + VALID, FEATURES, CLASSES, seed=1)


def model():
    torch.manual_seed(0)
    return torch.nn.Linear(FEATURES, CLASSES)


def make_loop(net, training=None, validation=None, callbacks=()):
    x, y = data()
    training = training if training is not None else TrainingEpochs((x[:TRAIN], y[:TRAIN]), BATCH, seed=3)
    validation = validation if validation is not None else ValidationBatches((x[TRAIN:], y[TRAIN:]), VALID_BATCH)
    return TrainingLoop(training, validation, torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9),
                        metrics=["accuracy"], callbacks=list(callbacks), include_default_callbacks=False)


class OneFewerOnRankOne:
    "Rank-aware training batches (as a length-bucketing sampler can be) whose rank 1 gets one batch fewer."
    def __init__(self): self.set_rank(0, 1)
    def set_rank(self, rank, world_size):
        x, y = data()
        self.batches = [(x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, TRAIN, BATCH)][:6 - rank]
    def __iter__(self): return iter(self.batches)


class Sized(OneFewerOnRankOne):
    def __len__(self): return len(self.batches)


class Stop(Callback):
    "Raises KeyboardInterrupt on every rank at the training batch_start where `loop.step == step` (Ctrl-C's path)."
    def __init__(self, step): self.step = step
    def batch_start(self, loop):
        if loop.phase == "training" and loop.step == self.step: raise KeyboardInterrupt


def without_time(history): return [{k: v for k, v in h.items() if k != "time"} for h in history]


def caught(fit) -> str:
    "The error a fit raised, as 'Type: message' (with its notes), or '' if it ran to the end."
    try: fit()
    except Exception as error: return f"{type(error).__name__}: {error}\n" + "\n".join(getattr(error, "__notes__", []))
    return ""


def one_epoch(**data) -> list[dict]:
    net = model()
    return make_loop(net, **data).fit(net, 1, device="cpu")


def repeat(out: Path, seen: dict) -> None:
    net = model()
    loop = make_loop(net)
    found = loop.lr_find(net, start_lr=1e-4, end_lr=0.5, num_steps=LR_STEPS, device="cpu")
    seen["lr_find"] = {"rates": found.rates, "losses": found.losses, "suggestion": found.suggestion,
                       "diverged": found.diverged}
    seen["histories"] = [without_time(loop.fit(net, 2, device="cpu")), without_time(loop.fit(net, 1, device="cpu"))]
    x, y = data()
    odd = TensorDataset(x[TRAIN:TRAIN + 33], y[TRAIN:TRAIN + 33])  # 33 samples: a DistributedSampler repeats one
    seen["errors"] = {"sized": caught(lambda: one_epoch(training=Sized())),
                      "unsized": caught(lambda: one_epoch(training=OneFewerOnRankOne())),
                      "padded": caught(lambda: one_epoch(validation=DataLoader(
                          odd, VALID_BATCH, sampler=DistributedSampler(odd, shuffle=False))))}
    seen["last"] = without_time(make_loop(net).fit(net, 1, device="cpu"))  # the group still serves after those errors
    seen["group_alive"] = dist.is_initialized()  # kept for the next fit; destroyed at exit


def stop_and_resume(out: Path, seen: dict, folder: Path) -> dict:
    "An uninterrupted fit; the same stopped at step 14 (inside epoch 2's training); resumed from `folder`."
    net = model()
    uninterrupted = without_time(make_loop(net).fit(net, 3, device="cpu"))
    kept = {k: v.clone() for k, v in net.state_dict().items()}
    stopped = model()
    try: make_loop(stopped, callbacks=[Checkpoint(folder, every_steps=4, every_epochs=None), Stop(14)]).fit(
        stopped, 3, device="cpu")
    except KeyboardInterrupt: pass
    seen["checkpoints"] = [p.name for p in list_checkpoints(folder)]
    resumed = model()
    history = without_time(make_loop(resumed, callbacks=[Checkpoint(folder, every_steps=4, every_epochs=None)]).fit(
        resumed, 3, device="cpu", resume_from=folder))
    seen["equal"] = history == uninterrupted and all(torch.equal(kept[k], v) for k, v in resumed.state_dict().items())
    return {"uninterrupted": uninterrupted, "resumed": history, "weights": kept, "resumed_weights": resumed.state_dict()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["repeat", "resume", "nodes"])
    parser.add_argument("out")
    args = parser.parse_args()
    out, seen, result = Path(args.out), {}, None
    if args.mode == "repeat": repeat(out, seen)
    elif args.mode == "resume": result = stop_and_resume(out, seen, out / "checkpoints")
    else:  # the checkpoint folder is relative: each node's working folder is its own
        net = model()
        seen["missing"] = caught(lambda: make_loop(net).fit(net, 1, device="cpu", resume_from="not-here"))
        result = stop_and_resume(out, seen, Path("checkpoints"))
        leave_process_group()
        seen["group_alive"] = dist.is_initialized()
    rank = int(os.environ["RANK"])  # torchrun's
    (out / f"rank{rank}.json").write_text(json.dumps(seen))
    if rank == 0 and result is not None: torch.save(result, out / "result.pt")


if __name__ == "__main__":
    sys.exit(main())
