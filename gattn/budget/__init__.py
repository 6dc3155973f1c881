"""Memory measurement and estimation for choosing a global-context strategy under a budget."""

from .estimate import (
    estimate_peak_memory,
    measure_peak_memory,
    persistent_bytes,
    profiled_peak_memory,
    train_step,
)
from .memory import peak_memory

__all__ = [
    "estimate_peak_memory",
    "measure_peak_memory",
    "peak_memory",
    "persistent_bytes",
    "profiled_peak_memory",
    "train_step",
]
