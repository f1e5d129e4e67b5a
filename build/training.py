"""What every source stage that builds a PyTorch model shares: a seeded, reproducible block.

Part of every model's source hash (see `kiln.build.pipeline`): a change here rebuilds.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def seeded(seed: int, *, deterministic: bool = False, threads: int | None = None) -> Iterator[None]:
    """Runs the block with torch's global RNG seeded to `seed`; the caller's RNG is restored after.

    Args:
        seed: Seeds torch's global RNG (weight init, dropout) inside the block.
        deterministic: Also turn on `torch.use_deterministic_algorithms` (for training).
        threads: Also run the block on this many intra-op threads.

    Every setting changed here is restored when the block ends, however it ends.
    """
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    previous_threads = torch.get_num_threads()
    try:
        if deterministic:
            torch.use_deterministic_algorithms(True)
        if threads is not None:
            torch.set_num_threads(threads)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_num_threads(previous_threads)
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
