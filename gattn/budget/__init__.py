"""Memory measurement and estimation for choosing a global-context strategy under a budget."""

from .memory import peak_memory

__all__ = ["peak_memory"]
