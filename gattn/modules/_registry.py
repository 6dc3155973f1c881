"""String registry of global-context blocks, after ``timm.layers.create_attn``.

Every entry is a drop-in block for a ``(B, C, H, W)`` feature map that returns the same
shape, so a recipe or a search space can name a block by string (``"nonlocal"``, ``"ppm"``)
and :func:`create` builds it for a given channel count.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

BlockFactory = Callable[..., nn.Module]
_Factory = TypeVar("_Factory", bound=BlockFactory)

_BLOCKS: dict[str, BlockFactory] = {}


def register_block(name: str) -> Callable[[_Factory], _Factory]:
    """Register ``factory(channels, **kwargs) -> nn.Module`` under ``name``.

    Args:
        name: Registry key, lower-case, e.g. ``"nonlocal"``.

    Returns:
        A decorator that registers and returns the factory unchanged.
    """

    def decorator(factory: _Factory) -> _Factory:
        if name in _BLOCKS and _BLOCKS[name] is not factory:
            raise ValueError(f"global-context block {name!r} is already registered")
        _BLOCKS[name] = factory
        return factory

    return decorator


def available() -> list[str]:
    """Names of all registered blocks, sorted."""
    return sorted(_BLOCKS)


def block_kwargs(name: str) -> list[str]:
    """Keyword arguments accepted by the block ``name`` (besides ``channels``)."""
    factory = _get(name)
    params = inspect.signature(factory).parameters
    return [p for p in params if p not in ("self", "channels")]


def _get(name: str) -> BlockFactory:
    try:
        return _BLOCKS[name]
    except KeyError:
        raise KeyError(
            f"unknown global-context block {name!r}; available: {', '.join(available())}"
        ) from None


def create(name: str, channels: int, **kwargs: Any) -> nn.Module:
    """Build the registered block ``name`` for a ``(B, channels, H, W)`` feature map.

    Args:
        name: A name from :func:`available`.
        channels: Channel count ``C`` of the feature map the block will see.
        **kwargs: Block-specific options (see :func:`block_kwargs`).

    Returns:
        An ``nn.Module`` mapping ``(B, C, H, W)`` to ``(B, C, H, W)``.

    Raises:
        KeyError: ``name`` is not registered (the message lists the valid names).
        TypeError: an option is not accepted by the block (the message lists the valid ones).
    """
    factory = _get(name)
    valid = block_kwargs(name)
    accepts_any = any(
        p.kind is inspect.Parameter.VAR_KEYWORD
        for p in inspect.signature(factory).parameters.values()
    )
    unknown = sorted(set(kwargs) - set(valid))
    if unknown and not accepts_any:
        raise TypeError(f"block {name!r} got unknown option(s) {unknown}; valid options: {valid}")
    return factory(channels, **kwargs)
