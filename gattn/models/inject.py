"""Insert registry blocks after named stages of a timm backbone.

This is how the source article's recipes are built: a non-local block (Wang et al. 2018,
"Non-local Neural Networks", https://arxiv.org/abs/1711.07971) after the stage at two thirds
of the depth of a CNN, a pyramid pooling module (Zhao et al. 2017, PSPNet) on top, or global
tokens after every Swin stage.

A spec names a block of :func:`gattn.modules.available` and a 1-based stage (see
:mod:`gattn.models.stages` for how stages are numbered per family)::

    inject(model, "nonlocal@3,ppm@4")
    inject(model, [{"block": "nonlocal", "stage": 3, "sub_sample": 2}])

Blocks injected at the same stage run in the order given. The stage is replaced by an
:class:`~gattn.models.stages.InjectedStage` that holds the original stage (``.stage``) and the
blocks (``.injected``, a :class:`~gattn.models.stages.LayoutAdapter`), so
the blocks are part of ``parameters()``, ``state_dict()`` and ``train()``/``eval()``, and
``forward``, ``forward_features`` and ``features_only`` models keep working.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from gattn.modules._registry import available, create

from .stages import InjectedStage, LayoutAdapter, StageInfo, model_stages

SpecItem = str | Mapping[str, Any]
Spec = str | Sequence[SpecItem] | None


@dataclass(frozen=True)
class Injection:
    """One block to insert.

    Attributes:
        block: Registry name, e.g. ``"nonlocal"``.
        stage: 1-based stage after which the block runs.
        kwargs: Block options passed to :func:`gattn.modules.create`.
    """

    block: str
    stage: int
    kwargs: Mapping[str, Any] = field(default_factory=dict)


def _parse_item(item: SpecItem) -> Injection:
    if isinstance(item, str):
        name, sep, stage = item.strip().partition("@")
        if not sep or not name.strip() or not stage.strip():
            raise ValueError(f"bad injection {item!r}: expected BLOCK@STAGE, e.g. 'nonlocal@3'")
        try:
            return Injection(name.strip(), int(stage))
        except ValueError:
            raise ValueError(f"bad injection {item!r}: stage {stage!r} is not an integer") from None
    if isinstance(item, Mapping):
        missing = [k for k in ("block", "stage") if k not in item]
        if missing:
            raise ValueError(f"bad injection {dict(item)!r}: missing key(s) {missing}")
        kwargs = {k: v for k, v in item.items() if k not in ("block", "stage")}
        stage = item["stage"]
        if isinstance(stage, bool) or not isinstance(stage, int):
            raise ValueError(f"bad injection {dict(item)!r}: stage must be an integer")
        return Injection(str(item["block"]), stage, kwargs)
    raise TypeError(f"bad injection {item!r}: expected 'BLOCK@STAGE' or a dict, got {type(item)}")


def parse_spec(
    spec: Spec,
    *,
    num_stages: int | None = None,
    blocks: Sequence[str] | None = None,
) -> list[Injection]:
    """Parse and check an injection spec, without touching any model.

    Args:
        spec: ``"nonlocal@3,ppm@4"``, a list of such items and/or dicts
            ``{"block": ..., "stage": ..., **block_kwargs}``, or ``None``/``""`` for none.
        num_stages: Stage count of the target model; stages must lie in ``1..num_stages``.
            ``None`` only checks that stages are positive.
        blocks: Valid block names; default :func:`gattn.modules.available`.

    Returns:
        The injections, in spec order.

    Raises:
        ValueError: a malformed item, an unknown block (the message lists the valid ones) or a
            stage out of range (the message says how many stages the model has).
    """
    if spec is None:
        return []
    items = [s for s in spec.split(",") if s.strip()] if isinstance(spec, str) else list(spec)
    valid = list(available() if blocks is None else blocks)
    injections = [_parse_item(item) for item in items]
    for inj in injections:
        if inj.block not in valid:
            raise ValueError(
                f"unknown block {inj.block!r} in injection spec; valid blocks: {', '.join(valid)}"
            )
        if inj.stage < 1 or (num_stages is not None and inj.stage > num_stages):
            where = f"1..{num_stages}" if num_stages is not None else ">= 1"
            has = f"; the model has {num_stages} stages" if num_stages is not None else ""
            raise ValueError(
                f"stage {inj.stage} of {inj.block}@{inj.stage} is out of range{has} "
                f"(stages are numbered {where})"
            )
    return injections


def _wrapper(model: nn.Module, stage: StageInfo) -> InjectedStage:
    module = model.get_submodule(stage.path)
    if isinstance(module, InjectedStage):
        return module
    adapter = LayoutAdapter(stage.layout, stage.num_prefix_tokens, stage.grid_size)
    wrapper = InjectedStage(module, adapter)
    wrapper.train(module.training)
    model.set_submodule(stage.path, wrapper)
    return wrapper


def inject(model: nn.Module, spec: Spec) -> nn.Module:
    """Insert registry blocks after stages of ``model``, in place.

    Args:
        model: A timm ResNet-family, ConvNeXt, Swin or ViT model, plain or built with
            ``features_only=True`` (possibly injected before).
        spec: See :func:`parse_spec`. Each block is built with the channel count of its stage.

    Returns:
        ``model`` itself, for chaining. The blocks are on the device and dtype of their stage's
        parameters and in the model's training mode.

    Raises:
        ValueError: invalid spec (see :func:`parse_spec`).
        TypeError: the model's stages cannot be found, or a block option is invalid.
    """
    stages = model_stages(model)
    names = ", ".join(f"{s.index}={s.path}" for s in stages)
    try:
        injections = parse_spec(spec, num_stages=len(stages))
    except ValueError as err:
        raise ValueError(f"{err} [{type(model).__name__} stages: {names}]") from None
    # Build every block before touching the model, so a bad option leaves it unchanged.
    blocks = [
        (stages[i.stage - 1], create(i.block, stages[i.stage - 1].channels, **i.kwargs))
        for i in injections
    ]
    for stage, block in blocks:
        wrapper = _wrapper(model, stage)
        like = next(wrapper.stage.parameters(), None)
        if like is not None:
            block.to(device=like.device, dtype=like.dtype)
        block.train(model.training)
        wrapper.injected.append(block)
    return model
