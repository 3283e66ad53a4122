"""One fit as a process of its own, for the process tests in test_resume.py.

    python long_run_child.py DIRECTORY MODE

MODE is `full` (train to the end), `stall` (stop inside the training batch_end of step 10, two steps after
the second checkpoint, and write DIRECTORY/ready; it waits there until a SIGTERM has reached the loop's handler,
or is killed), or `resume` (continue from
the newest checkpoint in DIRECTORY/checkpoints). `full` and `resume` save the final weights to
DIRECTORY/weights.pt and the history (without times) to DIRECTORY/history.json.
"""
import json
import signal
import sys
import time
from pathlib import Path

import torch

from trainloop_nb.callbacks.checkpoint import Checkpoint
from trainloop_nb.callbacks.logging import CSVLogger, TensorBoardLogger
from trainloop_nb.callbacks.schedule import LearningRateScheduler, ScheduleSegment, cosine, linear
from trainloop_nb.core import Callback
from trainloop_nb.data import TrainingEpochs, ValidationBatches
from trainloop_nb.loop import TrainingLoop

STALL_STEP = 10


class StallAt(Callback):
    """Inside the training batch_end of `step` (after Checkpoint), says so in a file and waits to be killed, or
    until a SIGTERM has gone through the loop's handler (which holds it until the batch is complete)."""
    order = 200

    def __init__(self, directory: Path, step: int): self.directory, self.step = directory, step

    def batch_end(self, loop):
        if loop.phase != "training" or loop.step != self.step: return
        received, loops_handler = [], signal.getsignal(signal.SIGTERM)
        def noted(signum, frame):
            loops_handler(signum, frame)  # the loop's own handler runs first: it must not raise inside the batch
            received.append(signum)
        signal.signal(signal.SIGTERM, noted)
        try:
            (self.directory / "ready").write_text(str(loop.step))
            deadline = time.monotonic() + 120
            while not received and time.monotonic() < deadline: time.sleep(0.01)  # a check with a deadline
        finally: signal.signal(signal.SIGTERM, loops_handler)
        if not received: raise RuntimeError("StallAt: no signal came in 120 s")


def build(directory: Path, stall: bool):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 6, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.25), torch.nn.Linear(16, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    callbacks = [LearningRateScheduler([ScheduleSegment(linear, 0.0, 0.01, 5), ScheduleSegment(cosine, end_rate=0.001)]),
                 CSVLogger(directory / "log.csv"), TensorBoardLogger(directory / "tb", flush_secs=60),
                 Checkpoint(directory / "checkpoints", every_steps=4, every_epochs=None, keep_last=None)]
    if stall: callbacks.append(StallAt(directory, STALL_STEP))
    loop = TrainingLoop(TrainingEpochs((x[:96], y[:96]), batch_size=16, seed=2), ValidationBatches((x[96:], y[96:]), 10),
                        optimizer, metrics=["accuracy"], callbacks=callbacks, include_default_callbacks=False)
    return loop, model


def main(directory: str, mode: str) -> None:
    directory = Path(directory)
    loop, model = build(directory, stall=mode == "stall")
    resume_from = directory / "checkpoints" if mode == "resume" else None
    history = loop.fit(model, epochs=3, device="cpu", resume_from=resume_from)
    torch.save(model.state_dict(), directory / "weights.pt")
    (directory / "history.json").write_text(json.dumps([{k: v for k, v in h.items() if k != "time"} for h in history]))


if __name__ == "__main__":
    main(*sys.argv[1:])
