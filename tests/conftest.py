"""Test-wide settings.

One intra-op thread per test: the models under test are tiny, and on shared 2-core machines
two OpenMP threads competing with other processes made a forward-backward pass 100x slower."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
