"""Counting reads of tensor values back to the host: the CPU stand-in for CUDA's sync debug mode."""
import contextlib
from unittest import mock

import torch

READS = ("item", "tolist", "__float__", "__int__", "__bool__")


@contextlib.contextmanager
def count_host_reads():
    "Within the block, count calls that read a tensor's value on the host; yields a one-item list."
    count = [0]
    with contextlib.ExitStack() as stack:
        for name in READS:
            original = getattr(torch.Tensor, name)
            def counting(self, *a, _original=original, **k):
                count[0] += 1
                return _original(self, *a, **k)
            stack.enter_context(mock.patch.object(torch.Tensor, name, counting))
        yield count
