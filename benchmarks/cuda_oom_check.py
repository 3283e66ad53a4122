"""Check fit(..., on_oom="split") against real CUDA out-of-memory errors (issue 24); needs a CUDA device.

The process is limited to --budget GiB of the device (`torch.cuda.set_per_process_memory_fraction`: the caching
allocator raises a real `torch.OutOfMemoryError` above it), so the checks are quick on any GPU:

  1. freed:       a model whose training forward holds two buffers a sample, sized so that a batch of 32 cannot
                  hold both. 2 micro-batches of 16 fit only if the failed try's first buffer was freed (held,
                  the split would need 4): the split must settle at 2, and the weights equal a run without buffers.
  2. one sample:  one sample cannot fit: the fit raises the OOM with its note, and while the error is held (as a
                  notebook holds the last one) the device holds none of the failed try's memory.
  3. activations: a deep MLP whose saved activations for the whole batch are about 1.5x the budget, trained for a
                  few steps; prints the split found, the peak memory and the time a step, and compares the weights
                  with a hand-written loop that runs the same micro-batches (loss_k * n_k / n, one step a batch).

    .venv/bin/python benchmarks/cuda_oom_check.py [--budget 8]

Exits 0 when every check passes, 1 when one fails, 2 without CUDA.
"""
import argparse
import sys
import time
import warnings

import torch

from trainloop_nb import TrainingLoop

GIB = 1 << 30


class Hungry(torch.nn.Module):
    "A linear model whose training forward holds two buffers of `per_sample` bytes a sample (none if 0)."
    def __init__(self, per_sample: int):
        super().__init__()
        self.net, self.per_sample = torch.nn.Linear(16, 4), per_sample

    def forward(self, x):
        if not (self.training and self.per_sample): return self.net(x)
        first = torch.empty(x.shape[0] * self.per_sample, dtype=torch.uint8, device=x.device)
        second = torch.empty(x.shape[0] * self.per_sample, dtype=torch.uint8, device=x.device)  # runs out first
        return self.net(x) + (first[:1].float() + second[:1].float()).nan_to_num() * 0


def batches(count: int, size: int, features: int, classes: int, seed: int = 0) -> list:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [(torch.randn(size, features, device="cuda", generator=g),
             torch.randint(0, classes, (size,), device="cuda", generator=g)) for _ in range(count)]


def fit(model: torch.nn.Module, data: list, lr: float = 0.1) -> TrainingLoop:
    loop = TrainingLoop(data, None, torch.optim.SGD(model.parameters(), lr=lr), include_default_callbacks=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "it and the later batches now run as N micro-batches": reported below
        loop.fit(model, 1, "cuda", on_oom="split")
    return loop


def budget_left(budget: int) -> int:
    torch.cuda.empty_cache()
    return budget - torch.cuda.memory_allocated()


def check_freed(budget: int) -> list[str]:
    per_sample = int(budget_left(budget) * 0.8) // 48  # 32 samples: a buffer is 0.53 of 80% of what is left
    data = batches(3, 32, 16, 4)
    allocated = torch.cuda.memory_allocated()
    torch.manual_seed(0)
    split_model = Hungry(per_sample).cuda()
    split = fit(split_model, data)
    left = torch.cuda.memory_allocated() - allocated
    torch.manual_seed(0)
    whole_model = Hungry(0).cuda()
    fit(whole_model, data)
    difference = max((a - b).abs().max().item() for a, b in zip(split_model.parameters(), whole_model.parameters()))
    print(f"1. freed: micro_batches {split.micro_batches} (2 expected), {left / 2**20:.1f} MiB left allocated by the "
          f"fit, weights against a run without buffers: max |difference| {difference:.2e}")
    failures = []
    if split.micro_batches != 2: failures.append("1: the split should settle at 2 micro-batches")
    if left > 64 * 2**20: failures.append("1: the fit left memory allocated")
    if difference > 1e-5: failures.append("1: the weights differ from the run without buffers")
    return failures


def check_one_sample(budget: int) -> list[str]:
    per_sample = int(budget_left(budget) * 0.6)  # one sample's first buffer fits, its second does not
    data = batches(2, 4, 16, 4)
    allocated = torch.cuda.memory_allocated()
    model = Hungry(per_sample).cuda()
    try:
        fit(model, data)
        return ["2: the fit should have raised torch.OutOfMemoryError"]
    except torch.OutOfMemoryError as error:
        held = error  # as a notebook holds the last error, with its traceback
        notes = "\n".join(getattr(held, "__notes__", []))
    left = torch.cuda.memory_allocated() - allocated
    print(f"2. one sample: raised with the note {'micro-batches of one sample' in notes}, "
          f"{left / 2**20:.1f} MiB allocated while the error is held")
    failures = []
    if "micro-batches of one sample" not in notes: failures.append("2: the error has no note saying why")
    if left > 64 * 2**20: failures.append("2: the held error keeps the failed try's memory")
    return failures


def deep_mlp(features: int, width: int, depth: int, classes: int) -> torch.nn.Module:
    layers = [torch.nn.Linear(features, width), torch.nn.ReLU()]
    for _ in range(depth - 1): layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, classes)).cuda()


def hand_loop(model: torch.nn.Module, data: list, parts: int, lr: float = 0.1) -> float:
    "The same micro-batches by hand: each loss weighted by its share of the samples, one step a batch."
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for x, y in data:
        optimizer.zero_grad(set_to_none=True)
        for xs, ys in zip(x.tensor_split(parts), y.tensor_split(parts)):
            (torch.nn.functional.cross_entropy(model(xs), ys) * (xs.shape[0] / x.shape[0])).backward()
        optimizer.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / len(data)


def check_activations(budget: int) -> list[str]:
    features, width, depth, classes, steps = 64, 1024, 16, 10, 4
    saved_a_sample = depth * width * 4  # autograd keeps each ReLU's float32 output (the next Linear's input too)
    size = int(1.5 * budget_left(budget) / saved_a_sample)
    data = batches(steps, size, features, classes)
    torch.manual_seed(0)
    model = deep_mlp(features, width, depth, classes)
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    started = time.perf_counter()
    loop = fit(model, data)
    torch.cuda.synchronize()
    loop_step = (time.perf_counter() - started) / steps  # the first step includes the tries that ran out
    peak = torch.cuda.max_memory_allocated()
    torch.manual_seed(0)
    reference = deep_mlp(features, width, depth, classes)
    hand_step = hand_loop(reference, data, loop.micro_batches)
    difference = max((a - b).abs().max().item() for a, b in zip(model.parameters(), reference.parameters()))
    print(f"3. activations: batches of {size:,} samples, {steps} steps; micro_batches {loop.micro_batches}; peak "
          f"{peak / GIB:.2f} GiB of a {budget / GIB:.0f} GiB budget; {loop_step * 1e3:.0f} ms a step (the first one's "
          f"tries included), the hand loop's {hand_step * 1e3:.0f} ms; weights against it: max |difference| "
          f"{difference:.2e}")
    failures = []
    if loop.micro_batches < 2: failures.append("3: the batch should not have fit whole")
    if difference > 1e-4: failures.append("3: the weights differ from the hand-written micro-batch loop")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=8.0, help="GiB of the device this process may use")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("cuda_oom_check needs a CUDA device; none is available here", file=sys.stderr)
        return 2
    total = torch.cuda.get_device_properties(0).total_memory
    budget = min(int(args.budget * GIB), int(total * 0.9))
    torch.cuda.set_per_process_memory_fraction(budget / total)
    torch.backends.cuda.matmul.allow_tf32 = False  # the weights are compared: full float32 products on both sides
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}; budget {budget / GIB:.1f} GiB of "
          f"{total / GIB:.0f} GiB")
    failures = check_freed(budget) + check_one_sample(budget) + check_activations(budget)
    print("\n".join(["FAILED " + f for f in failures] or ["all checks passed"]))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
