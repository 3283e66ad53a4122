"""TrainingLoop against its peers on one small job: per-epoch cost as a ratio to a plain PyTorch loop.

The job: an MLP 784-128-10 on synthetic data (a fixed random teacher labels Gaussian inputs), 80 training
and 20 validation batches of 128, SGD (momentum 0.9, rate 0.05), cross-entropy, accuracy, validation
every epoch, one CPU thread, nothing displayed. Contenders:

  plain loop                 a PyTorch loop over a DataLoader; validation loss and accuracy summed on the
                             device and read once per epoch; no training metrics
  plain + training metrics   the same, also summing the training loss and accuracy on the device
  by hand (tensors)          the same work as the previous line, batches cut from tensors by indexing (in
                             TrainingEpochs' order, so it ends with the same weights as the next but one)
  TrainingLoop (DataLoader)  TrainingLoop over the same DataLoaders, metrics=["accuracy"], no display
  TrainingLoop (epochs)      TrainingLoop over TrainingEpochs and ValidationBatches of the same tensors
  fastai Learner             over the same DataLoaders, accuracy on training and validation, no bar or log
  Lightning Trainer          the same LightningModule steps, loss and accuracy logged per epoch for both
                             phases, no progress bar, logger, checkpoints or summary

Per-epoch cost = (time of a 6-epoch fit - time of a 1-epoch fit) / 5, so that set-up (building a
trainer, the first batches' overheads) cancels. Each repeat runs every contender for both lengths,
in an order rotated from repeat to repeat; the table gives medians over the repeats, and each ratio
is the median of the per-repeat ratios to the plain loop of the same repeat. Targets: TrainingLoop
within 1.03x of "plain + training metrics" (the same numbers computed), and over TrainingEpochs within
1.05x of "by hand".

--steps N measures the two targets a second way, steadier on a shared machine: N one-epoch fits of each
of the four contenders concerned, in turn, with the clock stamped after every batch; the per-epoch cost is
80 x the median training step + 20 x the median validation step (the first step of each phase left out),
and the ratio is the median over rounds of the rounds' ratios. A whole fit's time swings with whatever
else the machine does; the median of a step does not.

fastai and lightning are never requirements of the project: `make benchmark-peers` makes .venv-peers
with the project, fastai and lightning, and runs this script there. A peer that is not installed is
reported and left out; the rest still run.

    make benchmark-peers PEERS_ARGS="--repeats 5"
    .venv-peers/bin/python benchmarks/peers.py --repeats 5 [--only plain,trainingloop] [--markdown table.md]
    .venv-peers/bin/python benchmarks/peers.py --steps 30
"""
import argparse
import importlib
import logging
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from trainloop_nb.core import Callback
from trainloop_nb.data import TrainingEpochs, ValidationBatches
from trainloop_nb.loop import TrainingLoop
from trainloop_nb.models import MLP

TRAIN_BATCHES, VALID_BATCHES, BATCH, LR, MOMENTUM = 80, 20, 128, 0.05, 0.9


# -- the job -----------------------------------------------------------------------------------
def make_tensors(seed=0):
    "Gaussian 784-d inputs labelled by a fixed random linear teacher (learnable, so accuracies are meaningful)."
    g = torch.Generator().manual_seed(seed)
    n_train, n_valid = TRAIN_BATCHES * BATCH, VALID_BATCHES * BATCH
    x = torch.randn(n_train + n_valid, 784, generator=g)
    y = (x @ torch.randn(784, 10, generator=g)).argmax(1)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def make_model():
    torch.manual_seed(0)
    return MLP([784, 128, 10])


def make_optimizer(params):
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)


def dataloaders(t):
    train = DataLoader(TensorDataset(t[0], t[1]), batch_size=BATCH, shuffle=True, drop_last=True,
                       generator=torch.Generator().manual_seed(0))
    return train, DataLoader(TensorDataset(t[2], t[3]), batch_size=BATCH)


# -- plain PyTorch -------------------------------------------------------------------------------
def _plain(t, epochs, training_metrics, batches_of, stamp=None):
    model, device = make_model(), torch.device("cpu")
    optimizer = make_optimizer(model.parameters())
    train, valid = batches_of(t)
    history = []
    for epoch in range(epochs):
        model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: no read per batch
        correct, count = torch.zeros((), dtype=torch.int64, device=device), 0
        for x, y in train(epoch):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            out = model(x)
            loss = F.cross_entropy(out, y)
            loss.backward()
            optimizer.step()
            if training_metrics:
                loss_sum += loss.detach() * len(y)
                correct += (out.argmax(1) == y).sum()
                count += len(y)
            if stamp is not None: stamp("training")
        record = {"train_loss": loss_sum.item() / count, "train_accuracy": correct.item() / count} if count else {}
        model.eval()
        loss_sum, correct, count = torch.zeros((), dtype=torch.float64, device=device), torch.zeros((), dtype=torch.int64, device=device), 0
        with torch.no_grad():
            for x, y in valid():
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                out = model(x)
                loss_sum += F.cross_entropy(out, y) * len(y)
                correct += (out.argmax(1) == y).sum()
                count += len(y)
                if stamp is not None: stamp("validation")
        history.append({**record, "valid_loss": loss_sum.item() / count, "valid_accuracy": correct.item() / count})
    return history[-1]


def _loader_batches(t):
    train, valid = dataloaders(t)
    return (lambda epoch: train), (lambda: valid)


def _indexed_batches(t):
    x, y, vx, vy = t
    epochs = TrainingEpochs((x, y), batch_size=BATCH, seed=0)  # only for its order: the same batches, same weights
    def train(epoch):
        order = epochs.epoch_order(epoch)
        for i in range(0, len(x) - BATCH + 1, BATCH):
            idx = order[i:i + BATCH]
            yield x[idx], y[idx]
    def valid():
        for i in range(0, len(vx), BATCH): yield vx[i:i + BATCH], vy[i:i + BATCH]
    return train, valid


def plain(t, epochs, stamp=None): return _plain(t, epochs, False, _loader_batches, stamp)
def plain_metrics(t, epochs, stamp=None): return _plain(t, epochs, True, _loader_batches, stamp)
def by_hand(t, epochs, stamp=None): return _plain(t, epochs, True, _indexed_batches, stamp)


# -- TrainingLoop ---------------------------------------------------------------------------------
def _statistics_callbacks():
    # Before the loop computed metrics itself, a Statistics callback did; include it so the work is equal.
    statistics_class = getattr(importlib.import_module("trainloop_nb.metrics"), "Statistics", None)
    return [statistics_class()] if statistics_class is not None else []


class _Stamp(Callback):
    "Stamps the clock after each batch, after every other callback (the plain loops stamp at the same point)."
    order = 10**9
    def __init__(self, stamp): self.stamp = stamp
    def batch_end(self, loop): self.stamp(loop.phase.value)


def _trainingloop(train, valid, epochs, stamp=None):
    model = make_model()
    loop = TrainingLoop(train, valid, make_optimizer(model.parameters()), metrics=["accuracy"],
                        callbacks=_statistics_callbacks() + ([_Stamp(stamp)] if stamp is not None else []),
                        include_default_callbacks=False)
    loop.fit(model, epochs=epochs, device="cpu")
    return loop.history[-1]


def trainingloop_dataloader(t, epochs, stamp=None): return _trainingloop(*dataloaders(t), epochs, stamp)


def trainingloop_epochs(t, epochs, stamp=None):
    return _trainingloop(TrainingEpochs((t[0], t[1]), batch_size=BATCH, seed=0),
                         ValidationBatches((t[2], t[3]), batch_size=BATCH), epochs, stamp)


# -- fastai ---------------------------------------------------------------------------------------
def fastai_learner(t, epochs):
    from functools import partial
    import fastai.callback.progress  # noqa: F401  (adds Learner.no_bar)
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from fastai.metrics import accuracy
    from fastai.optimizer import OptimWrapper
    train, valid = dataloaders(t)
    learn = Learner(DataLoaders(train, valid, device=torch.device("cpu")), make_model(), loss_func=F.cross_entropy,
                    opt_func=partial(OptimWrapper, opt=torch.optim.SGD, momentum=MOMENTUM), metrics=accuracy)
    learn.recorder.train_metrics = True  # accuracy on the training phase too, as the others compute
    with learn.no_bar(), learn.no_logging():
        learn.fit(epochs, lr=LR)
    names = learn.recorder.metric_names[1:-1]  # without "epoch" and "time"
    return dict(zip(names, learn.recorder.values[-1]))


# -- Lightning ------------------------------------------------------------------------------------
def lightning_trainer(t, epochs):
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = make_model()
        def _step(self, batch, phase):
            x, y = batch
            out = self.model(x)
            loss = F.cross_entropy(out, y)
            self.log(f"{phase}_loss", loss, on_step=False, on_epoch=True, batch_size=len(y))
            self.log(f"{phase}_accuracy", (out.argmax(1) == y).float().mean(), on_step=False, on_epoch=True,
                     batch_size=len(y))
            return loss
        def training_step(self, batch, batch_idx): return self._step(batch, "train")
        def validation_step(self, batch, batch_idx): return self._step(batch, "valid")
        def configure_optimizers(self): return make_optimizer(self.parameters())

    train, valid = dataloaders(t)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0)
    trainer.fit(Module(), train, valid)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


# -- the benchmark -------------------------------------------------------------------------------
CONTENDERS = {  # name: (label, function, module it needs beyond the project)
    "plain": ("plain loop (DataLoader)", plain, None),
    "plain_metrics": ("plain + training metrics", plain_metrics, None),
    "by_hand": ("by hand (indexing tensors)", by_hand, None),
    "trainingloop": ("TrainingLoop (DataLoader)", trainingloop_dataloader, None),
    "trainingloop_epochs": ("TrainingLoop (TrainingEpochs)", trainingloop_epochs, None),
    "fastai": ("fastai Learner", fastai_learner, "fastai"),
    "lightning": ("Lightning Trainer", lightning_trainer, "lightning"),
}
TARGETS = [("trainingloop", "plain_metrics", 1.03), ("trainingloop_epochs", "by_hand", 1.05)]


def target_contenders():
    "The contenders the two targets compare, in CONTENDERS' order."
    return sorted({name for pair in TARGETS for name in pair[:2]}, key=list(CONTENDERS).index)


def quiet_peers():
    "No banners, hints or warnings from the peers (after they are imported): the timings are of training, not printing."
    for name in list(logging.root.manager.loggerDict):
        if name.split(".")[0] in ("lightning", "lightning_fabric", "pytorch_lightning"):
            logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def available(names):
    "The contenders that can run here; says which peers are missing and why."
    usable = []
    for name in names:
        label, _, module = CONTENDERS[name]
        if module is not None:
            try: importlib.import_module(module)
            except Exception as error:  # not installed, or broken against this torch
                print(f"{label}: skipped, `import {module}` failed ({type(error).__name__}: {error}); "
                      f"`make benchmark-peers` installs it in .venv-peers", file=sys.stderr)
                continue
        usable.append(name)
    return usable


def timed(fn, t, epochs, threads):
    torch.set_num_threads(threads)  # a peer may have changed it on import or in set-up
    start = time.perf_counter()
    final = fn(t, epochs)
    seconds = time.perf_counter() - start
    if torch.get_num_threads() != threads: raise RuntimeError(f"{fn.__name__} changed the number of threads")
    return seconds, final


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--epochs", type=int, default=6, help="the long fit; the short one is 1 epoch (default 6)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", default=",".join(CONTENDERS), help="comma-separated contenders: " + ", ".join(CONTENDERS))
    p.add_argument("--markdown", help="also write the table to this file")
    p.add_argument("--steps", type=int, default=0, metavar="N",
                   help="instead: N rounds of one-epoch fits with every batch stamped, for the two targets")
    args = p.parse_args(argv)
    if args.epochs < 2 or args.repeats < 1: p.error("--epochs must be at least 2 and --repeats at least 1")
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown: p.error(f"unknown contenders {unknown}; choose from {list(CONTENDERS)}")
    if "plain" not in names: names.insert(0, "plain")  # the reference of every ratio
    torch.set_num_threads(args.threads)
    if args.steps: return stepwise(args.steps, args.threads, args.markdown)
    names = available(names)
    quiet_peers()
    t = make_tensors()

    failed = {}
    for name in list(names):  # warm-up: imports, allocator, first-call overheads; drops a contender that fails
        try: timed(CONTENDERS[name][1], t, 1, args.threads)
        except Exception as error:
            failed[name] = f"{type(error).__name__}: {error}"
            print(f"{CONTENDERS[name][0]}: skipped, it failed: {failed[name]}", file=sys.stderr)
            names.remove(name)

    per_epoch = {n: [] for n in names}
    finals = {}
    for r in range(args.repeats):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
        for name in order:
            fn = CONTENDERS[name][1]
            lengths = (1, args.epochs) if r % 2 == 0 else (args.epochs, 1)
            seconds = {}
            for epochs in lengths:
                seconds[epochs], final = timed(fn, t, epochs, args.threads)
                if epochs == args.epochs: finals[name] = final
            per_epoch[name].append((seconds[args.epochs] - seconds[1]) / (args.epochs - 1))
        print(f"repeat {r + 1}/{args.repeats}: " + "  ".join(f"{n} {per_epoch[n][-1] * 1e3:.1f} ms" for n in names),
              file=sys.stderr)

    def ratio(name, reference):
        return statistics.median(a / b for a, b in zip(per_epoch[name], per_epoch[reference]))

    lines = [f"Per-epoch cost, MLP 784-128-10, {TRAIN_BATCHES}+{VALID_BATCHES} batches of {BATCH}, SGD, accuracy, "
             f"{args.threads} thread{'s' * (args.threads > 1)}, medians of {args.repeats} "
             f"(torch {torch.__version__}{_versions(names)}):", "",
             "| contender | ms per epoch | × plain loop | valid accuracy |", "| --- | ---: | ---: | ---: |"]
    for name in names:
        accuracy = finals[name].get("valid_accuracy")
        lines.append(f"| {CONTENDERS[name][0]} | {statistics.median(per_epoch[name]) * 1e3:.1f} | "
                     f"{ratio(name, 'plain'):.2f} | {'' if accuracy is None else f'{accuracy:.3f}'} |")
    lines.append("")
    for name, reference, target in TARGETS:
        if name in names and reference in names:
            value = ratio(name, reference)
            lines.append(f"{CONTENDERS[name][0]} / {CONTENDERS[reference][0]}: {value:.3f} "
                         f"(target <= {target}: {'met' if value <= target else 'NOT met'})")
    for name, why in failed.items(): lines.append(f"{CONTENDERS[name][0]}: failed ({why})")
    print("\n".join(lines))
    if args.markdown:
        with open(args.markdown, "w") as f: f.write("\n".join(lines) + "\n")


def stepwise(rounds, threads, markdown=None):
    "The targets' ratios from the median step of one-epoch fits taken in turn (see the module's docstring)."
    t = make_tensors()
    names = target_contenders()
    steps = {n: {"training": [], "validation": []} for n in names}
    rounds_cost = {n: [] for n in names}
    for name in names: timed(CONTENDERS[name][1], t, 1, threads)  # warm-up
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            stamps = []
            torch.set_num_threads(threads)
            CONTENDERS[name][1](t, 1, stamp=lambda phase: stamps.append((phase, time.perf_counter())))
            medians = {}
            for phase in ("training", "validation"):
                times = [b - a for (p, a), (q, b) in zip(stamps, stamps[1:]) if p == q == phase][1:]
                steps[name][phase] += times
                medians[phase] = statistics.median(times)
            rounds_cost[name].append(TRAIN_BATCHES * medians["training"] + VALID_BATCHES * medians["validation"])
    lines = [f"Median step, MLP 784-128-10, {TRAIN_BATCHES}+{VALID_BATCHES} batches of {BATCH}, {threads} thread"
             f"{'s' * (threads > 1)}, {rounds} one-epoch fits each, taken in turn (torch {torch.__version__}):", "",
             "| contender | training step µs | validation step µs | per epoch ms |", "| --- | ---: | ---: | ---: |"]
    for name in names:
        train, valid = (statistics.median(steps[name][p]) for p in ("training", "validation"))
        lines.append(f"| {CONTENDERS[name][0]} | {train * 1e6:.0f} | {valid * 1e6:.0f} | "
                     f"{(TRAIN_BATCHES * train + VALID_BATCHES * valid) * 1e3:.1f} |")
    lines.append("")
    for name, reference, target in TARGETS:
        ratios = sorted(a / b for a, b in zip(rounds_cost[name], rounds_cost[reference]))
        value = statistics.median(ratios)
        lines.append(f"{CONTENDERS[name][0]} / {CONTENDERS[reference][0]}: {value:.3f} (rounds' ratios "
                     f"{ratios[len(ratios) // 4]:.3f} to {ratios[(3 * len(ratios)) // 4]:.3f}, middle half; "
                     f"target <= {target}: {'met' if value <= target else 'NOT met'})")
    print("\n".join(lines))
    if markdown:
        with open(markdown, "w") as f: f.write("\n".join(lines) + "\n")


def _versions(names):
    found = []
    for name, module in (("fastai", "fastai"), ("lightning", "lightning")):
        if name in names: found.append(f", {module} {importlib.import_module(module).__version__}")
    return "".join(found)


if __name__ == "__main__":
    main()
