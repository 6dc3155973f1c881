"""The search space of the ``tune`` stage and what one sample of it means.

A sample (a dict of the knobs :meth:`pipelines.config.TuneParams.choices` lists, plus ``lr``)
becomes a :func:`gattn.models.build_model` config (:func:`model_config`): the family's
backbone, the registry block injected after the last or second-last stage (how large, how
many, fused or plain attention), the decode head for segmentation; for detection, the
family's detector recipe (which fixes the FPN's finest level and global modules). The block
and head names are checked against the registries before the sweep starts
(:func:`check_params`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from gattn import modules as registry
from gattn.models import Segmenter, build_model, model_stages
from pipelines.config import ParamsError, Task, TuneParams

ATTENTION_BLOCKS = ("global_attn", "global_tokens", "window_attn", "shifted_window_attn")


def check_params(p: TuneParams) -> None:
    """Check the names ``tune`` refers to (blocks, heads) against the registries.

    Raises:
        ParamsError: naming the key and the valid values.
    """
    from gattn.models import HEADS

    blocks = set(registry.available())
    bad = [m for m in p.modules if m != "none" and m not in blocks]
    if bad:
        raise ParamsError(f"tune.modules: unknown block(s) {bad}; valid: none, {sorted(blocks)}")
    for size, table in p.module_sizes.items():
        unknown = sorted(set(table) - blocks)
        if unknown:
            raise ParamsError(f"tune.module_sizes.{size}: unknown block(s) {unknown}")
    bad = [h for h in p.heads if h not in HEADS]
    if bad:
        raise ParamsError(f"tune.heads: unknown head(s) {bad}; valid: {sorted(HEADS)}")


def search_space(p: TuneParams, task: Task) -> dict[str, Any]:
    """The Tune search space of ``p`` for a task kind (:meth:`TuneParams.choices`: categorical
    knobs, ``head`` for segmentation only) and a log-uniform learning rate."""
    from ray import tune

    choices = p.choices(task)
    heads = choices.pop("head", None)
    space: dict[str, Any] = {k: tune.choice(v) for k, v in choices.items()}
    space["lr"] = tune.loguniform(*p.lr)
    if heads is not None:
        space["head"] = tune.choice(heads)
    return space


def model_config(
    sample: Mapping[str, Any], p: TuneParams, task: Task, num_classes: int, in_chans: int
) -> dict[str, Any]:
    """The :func:`gattn.models.build_model` config a sample describes.

    ``position`` ``last`` injects after the backbone's last stage, ``second_last`` after the
    one before (the first stage when there is only one); ``num_blocks`` copies of the block.
    A detection family's ``backbone`` is a detector recipe, built as it is (its own
    ``backbone_kwargs``, if any, replace the recipe's).
    """
    family = p.families[sample["family"]]
    if task == "det":
        det = {"task": task, "recipe": family.backbone, "num_classes": num_classes}
        det.update(in_chans=in_chans, img_size=int(sample["img_size"]))
        if family.backbone_kwargs:
            det["backbone_kwargs"] = dict(family.backbone_kwargs)
        return det
    cfg: dict[str, Any] = {
        "task": task,
        "backbone": family.backbone,
        "backbone_kwargs": dict(family.backbone_kwargs),
        "num_classes": num_classes,
        "in_chans": in_chans,
        "img_size": int(sample["img_size"]),
    }
    if task == "seg":
        cfg.update(head=sample.get("head", p.heads[0]), head_channels=p.head_channels)
    module = sample["module"]
    if module != "none":
        probe = build_model({**cfg, "num_classes": max(1, num_classes)})
        backbone = probe.encoder if isinstance(probe, Segmenter) else probe  # seg: a Segmenter
        stages = len(model_stages(backbone))
        stage = stages if sample["position"] == "last" else max(1, stages - 1)
        options = dict(p.module_sizes[sample["module_size"]].get(module, {}))
        if module in ATTENTION_BLOCKS:
            options["fused_attn"] = sample["attn_impl"] == "fused"
        cfg["inject"] = [{"block": module, "stage": stage, **options}] * int(sample["num_blocks"])
    return cfg


def summary(sample: Mapping[str, Any]) -> str:
    """A one-line description of a sample, e.g. ``vit +global_attn(large,plain)x2@last``."""
    text = sample["family"]
    if sample.get("module", "none") != "none":  # a detection search has no module knob
        impl = f",{sample['attn_impl']}" if sample["module"] in ATTENTION_BLOCKS else ""
        text += (
            f" +{sample['module']}({sample['module_size']}{impl})x{sample['num_blocks']}"
            f"@{sample['position']}"
        )
    if "head" in sample:
        text += f" {sample['head']} head"
    return f"{text}, batch {sample['batch_size']} @ {sample['img_size']}px"


def trial_id(sample: Mapping[str, Any]) -> str:
    """A stable id of a sample (the same config gets the same id)."""
    blob = json.dumps(dict(sample), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]
