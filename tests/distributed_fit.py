"""A fit for tests/test_distributed.py to launch under torchrun: `torchrun --nproc_per_node=2 distributed_fit.py OUT`.

Every rank trains the same seeded model on its share of the data; rank 0 saves the weights, history and step
count to OUT/result.pt; each rank writes OUT/rank<r>.json (what it saw); `--fail-on-rank R` raises in rank R
at its second step, to check that one failing rank ends the run; `--compile` fits with `compile=True`.
"""
import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from toy_runs import toy_data  # the test folder is the script's folder, so sys.path has it
from trainloop_nb.callbacks.logging import CSVLogger
from trainloop_nb.callbacks.progress import ProgressPrinter
from trainloop_nb.core import Callback
from trainloop_nb.data import TrainingEpochs, ValidationBatches
from trainloop_nb.distributed import leave_process_group
from trainloop_nb.loop import TrainingLoop

TRAIN, VALID, FEATURES, CLASSES = 72, 34, 6, 3
BATCH, VALID_BATCH, EPOCHS, ACCUMULATE = 4, 8, 2, 2


def data():
    return toy_data(TRAIN + VALID, FEATURES, CLASSES, seed=1)


def model():
    torch.manual_seed(0)
    return torch.nn.Linear(FEATURES, CLASSES)


class CountGradientSyncs(Callback):
    "Counts DDP's gradient all-reduces (one bucket here): they must happen on the steps only, not every batch."
    order = -1000
    def __init__(self): self.syncs = 0
    def fit_start(self, loop):
        ddp = loop._placed.ddp  # the fit's own DDP wrapper: no public way to see its communication, so read it here
        def hook(state, bucket):
            self.syncs += 1
            return default_hooks.allreduce_hook(dist.group.WORLD, bucket)
        ddp.register_comm_hook(None, hook)


class FailOnRank(Callback):
    def __init__(self, rank): self.rank = rank
    def batch_end(self, loop):
        if loop.rank == self.rank and loop.step == 2: raise RuntimeError(f"rank {loop.rank} fails on purpose")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--fail-on-rank", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="fit(..., compile=True): the DDP wrapper around the compiled model")
    args = parser.parse_args()
    out = Path(args.out)
    x, y = data()
    net = model()
    counter = CountGradientSyncs()
    callbacks = [counter, ProgressPrinter(mode="plain", file=sys.stdout), CSVLogger(out / "log.csv")]
    if args.fail_on_rank is not None: callbacks.append(FailOnRank(args.fail_on_rank))
    loop = TrainingLoop(TrainingEpochs((x[:TRAIN], y[:TRAIN]), BATCH, seed=3),
                        ValidationBatches((x[TRAIN:], y[TRAIN:]), VALID_BATCH),
                        torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9), metrics=["accuracy", "mcc"],
                        callbacks=callbacks, include_default_callbacks=False)
    loop.fit(net, EPOCHS, device="cpu", accumulate_steps=ACCUMULATE, compile=args.compile)
    seen = {"rank": loop.rank, "world_size": loop.world_size, "step": loop.step, "syncs": counter.syncs,
            "group_alive": dist.is_initialized(), "history": loop.history}
    leave_process_group()  # the loop made the group and keeps it for later fits; the script may end it
    seen["group_left"] = not dist.is_initialized()
    (out / f"rank{loop.rank}.json").write_text(json.dumps(seen))
    if loop.rank == 0: torch.save({"state": net.state_dict(), "history": loop.history}, out / "result.pt")


if __name__ == "__main__":
    main()
