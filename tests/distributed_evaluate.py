"""`loop.validate` and `loop.predict` under `torchrun --nproc_per_node=2` (tests/test_evaluate.py launches it).

Each rank validates and predicts the same model over `ValidationBatches` (whole batches dealt in turn), a DataLoader
with a `DistributedSampler` (samples dealt in turn) and a plain list (run whole on every rank), and writes what it got
to OUT/rank<r>.pt."""
import os
import sys

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from trainloop_nb.data import ValidationBatches
from trainloop_nb.loop import TrainingLoop

SAMPLES, FEATURES, CLASSES, BATCH = 50, 6, 3, 8


def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(SAMPLES, FEATURES, generator=g)
    return x, torch.randint(0, CLASSES, (SAMPLES,), generator=g)


def model():
    torch.manual_seed(0)
    return torch.nn.Linear(FEATURES, CLASSES)


def loaders(x, y):
    dataset = TensorDataset(x, y)
    return {"validation_batches": ValidationBatches((x, y), BATCH),
            "sampler": DataLoader(dataset, BATCH, sampler=DistributedSampler(
                dataset, int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"]), shuffle=False)),
            "list": [(x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, SAMPLES, BATCH)]}


if __name__ == "__main__":
    out = sys.argv[-1]
    x, y = data()
    net = model()
    loop = TrainingLoop([(x, y)], None, torch.optim.SGD(net.parameters(), lr=0.1), metrics=["accuracy", "mcc"],
                        include_default_callbacks=False)
    results = {}
    for name, loader in loaders(x, y).items():
        predictions, targets = loop.predict(loader, model=net, with_targets=True)
        results[name] = {"validate": loop.validate(loader, model=net), "predictions": predictions, "targets": targets}
    rank = dist.get_rank()
    torch.save({"rank": rank, "world_size": dist.get_world_size(), "results": results}, f"{out}/rank{rank}.pt")
