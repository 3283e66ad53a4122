"""Prove that the training hot path never makes the host wait for the GPU.

Trains with TrainingLoop on CUDA (default callbacks, plain printing, metrics accuracy, top-5, MCC and
perplexity) with `torch.cuda.set_sync_debug_mode("error")` switched on for every training phase: any
host synchronisation inside the training batches (`.item()`, `float(t)`, `bincount`, a blocking copy)
raises. The check is switched off after the last training batch, where the loop reads the metrics once per phase by design.
Then it compares the same fit on CPU and CUDA (metrics should agree closely) and prints the overhead
ratio against a hand-written loop on CUDA.

    .venv/bin/python benchmarks/cuda_sync_check.py        # needs a CUDA device
"""
import io
import subprocess
import sys

import torch

from trainloop_nb import Callback, ProgressPrinter, TrainingEpochs, TrainingLoop, ValidationBatches
from trainloop_nb.models import MLP


class SyncGuard(Callback):
    "Raise on any host-device synchronisation during the training batches."
    def training_start(self, loop): torch.cuda.set_sync_debug_mode("error")
    def batch_end(self, loop):
        # off after the last training batch: the loop then reads the phase's metrics, once, by design
        if loop.phase == "training" and loop.batch_index + 1 == loop.batch_count: torch.cuda.set_sync_debug_mode(0)
    def fit_end(self, loop): torch.cuda.set_sync_debug_mode(0)


def fit(device, guard):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4096, 784, generator=g), torch.randint(0, 10, (4096,), generator=g)
    if device == "cuda": x, y = x.pin_memory(), y.pin_memory()  # so non_blocking copies really are asynchronous
    torch.manual_seed(0)
    model = MLP([784, 128, 10])
    loop = TrainingLoop(TrainingEpochs((x[:3072], y[:3072]), batch_size=128), ValidationBatches((x[3072:], y[3072:]), 100),
                        torch.optim.Adam(model.parameters(), lr=1e-3),
                        metrics=["accuracy", "top5_accuracy", "mcc", "perplexity"],
                        callbacks=[ProgressPrinter(mode="plain", file=io.StringIO())] + ([SyncGuard()] if guard else []))
    loop.fit(model, epochs=3, device=device)
    return loop.history[-1]


def main():
    if not torch.cuda.is_available():
        print("CUDA is not available here: nothing to check (run this on a machine with an NVIDIA GPU)")
        return 0
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    cuda = fit("cuda", guard=True)
    print("CUDA fit with set_sync_debug_mode('error') over the training batches: no synchronisation")
    cpu = fit("cpu", guard=False)
    for key in cuda:
        if key != "time": print(f"  {key:28s} cpu {cpu[key]:.6f}   cuda {cuda[key]:.6f}")
    subprocess.run([sys.executable, "benchmarks/overhead.py", "--device", "cuda", "--repeats", "5"], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
