"""Prove that the training hot path never makes the host wait for the GPU, in every precision and with accumulation.

Trains with TrainingLoop on CUDA (default callbacks, plain printing, metrics accuracy, top-5, MCC and perplexity)
with `torch.cuda.set_sync_debug_mode` on for every training phase. It runs these configurations:

    precision="32", "bf16-mixed" and "16-mixed"; accumulate_steps=4; GradientClipping (when the package has it)

A host synchronisation inside the training batches (`.item()`, `float(t)`, `bincount`, a blocking copy) is counted
(mode "warn", one warning each). The expected count is 0, except with "16-mixed": `GradScaler.step` reads its
overflow flag once per step before an optimizer that cannot skip a step on the device (PyTorch's own read; the
loop adds none), so there exactly one per step is expected. The check is switched off after the last training
batch, where the loop reads the metrics once per phase by design. Then it compares each fit on CPU and CUDA
(metrics should agree closely) and prints the overhead ratio against a hand-written loop on CUDA.

    .venv/bin/python benchmarks/cuda_sync_check.py        # needs a CUDA device
"""
import io
import subprocess
import sys
import warnings

import torch

from trainloop_nb import Callback, ProgressPrinter, TrainingEpochs, TrainingLoop, ValidationBatches
from trainloop_nb.models import MLP


def gradient_clipping():
    "GradientClipping(max_norm=1.0) if this version of the package has it, else None."
    try: from trainloop_nb import GradientClipping
    except ImportError: return None
    return GradientClipping(max_norm=1.0)


class SyncGuard(Callback):
    "Count host-device synchronisations during the training batches (sync debug mode 'warn': one warning each)."
    def __init__(self): self.syncs, self._catcher = 0, None
    def training_start(self, loop):
        self._catcher = warnings.catch_warnings(record=True)
        self._seen = self._catcher.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
    def batch_end(self, loop):
        # off after the last training batch: the loop then reads the phase's metrics, once, by design
        if loop.phase == "training" and loop.batch_index + 1 == loop.batch_count: self._stop()
    def fit_end(self, loop): self._stop()
    def _stop(self):
        torch.cuda.set_sync_debug_mode(0)
        if self._catcher is None: return
        self.syncs += sum("synchroniz" in str(w.message) for w in self._seen)
        self._catcher.__exit__(None, None, None)
        self._catcher = None


def fit(device, guard=None, precision="32", accumulate_steps=1, clipping=False):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4096, 784, generator=g), torch.randint(0, 10, (4096,), generator=g)
    if device == "cuda": x, y = x.pin_memory(), y.pin_memory()  # so non_blocking copies really are asynchronous
    torch.manual_seed(0)
    model = MLP([784, 128, 10])
    callbacks = [ProgressPrinter(mode="plain", file=io.StringIO())] + ([guard] if guard else [])
    if clipping: callbacks.append(gradient_clipping())
    loop = TrainingLoop(TrainingEpochs((x[:3072], y[:3072]), batch_size=128), ValidationBatches((x[3072:], y[3072:]), 100),
                        torch.optim.Adam(model.parameters(), lr=1e-3),
                        metrics=["accuracy", "top5_accuracy", "mcc", "perplexity"], callbacks=callbacks)
    loop.fit(model, epochs=3, device=device, precision=precision, accumulate_steps=accumulate_steps)
    return loop


CONFIGURATIONS = [dict(precision="32"), dict(precision="bf16-mixed"), dict(precision="16-mixed"),
                  dict(accumulate_steps=4), dict(precision="bf16-mixed", accumulate_steps=4), dict(clipping=True),
                  dict(precision="16-mixed", clipping=True)]


def main():
    if not torch.cuda.is_available():
        print("CUDA is not available here: nothing to check (run this on a machine with an NVIDIA GPU)")
        return 0
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    failures = []
    for options in CONFIGURATIONS:
        if options.get("clipping") and gradient_clipping() is None:
            print(f"{options}: skipped, this version of the package has no GradientClipping")
            continue
        guard = SyncGuard()
        cuda = fit("cuda", guard, **options)
        expected = cuda.step if options.get("precision") == "16-mixed" else 0  # GradScaler's own read, once per step
        verdict = "ok" if guard.syncs == expected else "FAILED"
        if verdict != "ok": failures.append(options)
        print(f"{options}: {guard.syncs} synchronisations in {cuda.step} steps over the training batches "
              f"(expected {expected}) {verdict}")
        cpu_options = options if options.get("precision") != "16-mixed" else {**options, "precision": "32"}
        cpu = fit("cpu", **cpu_options)
        for key, value in cuda.history[-1].items():
            if key != "time": print(f"  {key:28s} cpu {cpu.history[-1][key]:.6f}   cuda {value:.6f}")
    subprocess.run([sys.executable, "benchmarks/overhead.py", "--device", "cuda", "--repeats", "5"], check=True)
    if failures: print("host synchronisations where none were expected:", failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
