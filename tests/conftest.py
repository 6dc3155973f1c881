"""Test-wide settings and data.

One intra-op thread per test: the models under test are tiny, and on shared 2-core machines
two OpenMP threads competing with other processes made a forward-backward pass 100x slower.
:func:`mnist_like` writes a tiny data set in the MNIST family's own files, so the torchvision
data tests need no download and no system package."""

from __future__ import annotations

import gzip
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    """``array`` (uint8; N x H x W images or N labels) as an IDX file, the MNIST family's
    format: magic ``0x00000803`` (images) or ``0x00000801`` (labels), then each dimension as a
    big-endian int32, then the bytes; gzipped to ``path.gz`` with ``gz``."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


@pytest.fixture
def mnist_like() -> Callable[..., dict[str, tuple[np.ndarray, np.ndarray]]]:
    """``make(root, name="FashionMNIST", n_train=30, n_test=10, gz=False, seed=0)``: a tiny
    MNIST-family data set in torchvision's layout, ``root/<name>/raw/{train,t10k}-*-ubyte``
    (gzipped with ``gz``), 28 x 28 random images, labels cycling over 10 classes. Returns the
    arrays written: ``{"train": (images, labels), "test": (images, labels)}``."""

    def make(
        root: Path,
        name: str = "FashionMNIST",
        n_train: int = 30,
        n_test: int = 10,
        gz: bool = False,
        seed: int = 0,
    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        rng = np.random.default_rng(seed)
        raw = root / name / "raw"
        written = {}
        for part, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
            images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
            labels = (np.arange(n) % 10).astype(np.uint8)
            write_idx(raw / f"{prefix}-images-idx3-ubyte", images, gz)
            write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels, gz)
            written[part] = (images, labels)
        return written

    return make
