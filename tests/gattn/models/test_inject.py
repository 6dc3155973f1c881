"""Injection into timm ResNet, ConvNeXt, Swin (NHWC) and ViT (tokens), plain and features_only.

The layout checks compare against timm's own ``forward_intermediates`` (an independent NCHW
view of a stage's output) and against hooks on the original stage.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

import gattn.modules.non_local  # noqa: F401  (registers "nonlocal")
import gattn.modules.squeeze_excite  # noqa: F401  (registers "se")
from gattn.models import InjectedStage, inject, model_stages, parse_spec
from gattn.models.inject import Injection
from gattn.modules._registry import register_block
from gattn.modules.non_local import NonLocalBlock
from gattn.modules.squeeze_excite import SEBlock


@register_block("_probe")
class Probe(nn.Module):
    """Records its input and adds a tensor whose every (c, h, w) entry differs."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(()))
        self.seen: torch.Tensor | None = None

    @staticmethod
    def delta(shape: torch.Size) -> torch.Tensor:
        _, C, H, W = shape
        return torch.arange(C * H * W, dtype=torch.float32).reshape(1, C, H, W) / (C * H * W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x.detach().clone()
        return x + self.gain * self.delta(x.shape)


SWIN = dict(img_size=32, window_size=4, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2))
VIT = dict(img_size=(32, 48), patch_size=8, embed_dim=32, depth=3, num_heads=2, reg_tokens=2)

# (model, kwargs, input size, stage, timm feature module of that stage, features_only path)
CASES = {
    "resnet": ("resnet18", {}, (32, 32), 3, "layer3", "layer3"),
    "convnext": ("convnext_atto", {}, (32, 32), 2, "stages.1", "stages_1"),
    "swin": ("swin_tiny_patch4_window7_224", SWIN, (32, 32), 2, "layers.1", "layers_1"),
    "vit": ("vit_tiny_patch16_224", VIT, (32, 48), 2, "blocks.1", "model.blocks.1"),
}


def _create(case: str, **kwargs) -> nn.Module:
    name, model_kwargs, *_ = CASES[case]
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **model_kwargs, **kwargs)


def _input(case: str, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, *CASES[case][2], generator=torch.Generator().manual_seed(1))


def _injected(model: nn.Module, cls: type[nn.Module]) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, cls)]


@pytest.mark.parametrize("case", CASES)
def test_block_sees_the_stage_output_as_nchw_and_its_change_lands_in_place(case: str) -> None:
    model = _create(case).eval()
    ref = copy.deepcopy(model)
    _, _, _, stage, module_name, _ = CASES[case]
    inject(model, f"_probe@{stage}")
    x = _input(case)
    wrapper = model.get_submodule(module_name)
    assert isinstance(wrapper, InjectedStage)
    outs = {}
    wrapper.stage.register_forward_hook(lambda m, i, o: outs.update(stage=o))
    wrapper.register_forward_hook(lambda m, i, o: outs.update(wrapper=o))
    with torch.no_grad():
        model.forward_features(x)
        idx = [e["module"] for e in ref.feature_info].index(module_name)
        (expected,) = ref.forward_intermediates(
            x, indices=[idx], norm=False, output_fmt="NCHW", intermediates_only=True
        )
    probe = _injected(model, Probe)[0]
    torch.testing.assert_close(probe.seen, expected)

    delta = Probe.delta(expected.shape).expand_as(expected)
    if case == "swin":
        delta = delta.permute(0, 2, 3, 1)
    elif case == "vit":
        prefix = torch.zeros(x.shape[0], model.num_prefix_tokens, delta.shape[1])
        delta = torch.cat([prefix, delta.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)
    torch.testing.assert_close(outs["wrapper"], outs["stage"] + delta)


@pytest.mark.parametrize("case", CASES)
def test_identity_nonlocal_keeps_outputs_and_trains(case: str) -> None:
    model = _create(case, num_classes=5).eval()
    ref = copy.deepcopy(model)
    stage = CASES[case][3]
    inject(model, f"nonlocal@{stage}")
    x = _input(case)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x))
        torch.testing.assert_close(model.forward_features(x), ref.forward_features(x))

    model.train()
    model(x).square().mean().backward()
    (block,) = _injected(model, NonLocalBlock)
    assert block.training
    assert all(p.grad is not None for p in block.parameters())
    assert block.norm.weight.grad.abs().sum() > 0  # the zero-initialised output map learns
    assert any(p is block.norm.weight for p in model.parameters())
    model.eval()
    assert not block.training


@pytest.mark.parametrize("case", CASES)
def test_features_only_models_take_injection(case: str) -> None:
    model = _create(case, features_only=True).eval()
    ref = copy.deepcopy(model)
    _, _, _, stage, _, fo_path = CASES[case]
    assert model_stages(model)[stage - 1].path == fo_path
    inject(model, f"nonlocal@{stage}")
    assert isinstance(model.get_submodule(fo_path), InjectedStage)
    x = _input(case)
    with torch.no_grad():
        outs, refs = model(x), ref(x)
    for out, expected in zip(outs, refs, strict=True):
        torch.testing.assert_close(out, expected)


def test_stage_table_per_family() -> None:
    resnet = model_stages(_create("resnet"))
    assert [(s.path, s.channels, s.layout) for s in resnet] == [
        ("layer1", 64, "nchw"),
        ("layer2", 128, "nchw"),
        ("layer3", 256, "nchw"),
        ("layer4", 512, "nchw"),
    ]
    swin = model_stages(_create("swin"))
    assert [(s.path, s.channels, s.layout) for s in swin] == [
        (f"layers.{i}", 16 * 2**i, "nhwc") for i in range(4)
    ]
    vit = model_stages(_create("vit"))
    assert [s.path for s in vit] == ["blocks.0", "blocks.1", "blocks.2"]
    assert {(s.layout, s.channels, s.num_prefix_tokens, s.grid_size) for s in vit} == {
        ("tokens", 32, 3, (4, 6))
    }


def test_blocks_at_one_stage_run_in_order_in_one_wrapper() -> None:
    model = _create("resnet").eval()
    inject(model, "nonlocal@3")
    inject(model, [{"block": "se", "stage": 3, "rd_ratio": 0.25}])
    wrapper = model.layer3
    assert isinstance(wrapper, InjectedStage) and not isinstance(wrapper.stage, InjectedStage)
    assert [type(b) for b in wrapper.injected] == [NonLocalBlock, SEBlock]
    assert wrapper.injected[1].fc1.out_channels == 256 // 4
    x = torch.randn(1, 256, 3, 3)
    torch.testing.assert_close(wrapper.injected[1](wrapper.injected[0](x)), wrapper.injected(x))
    assert any(k.startswith("layer3.injected.1.") for k in model.state_dict())


@pytest.mark.parametrize("case", ["resnet", "convnext"])
def test_timm_gradient_checkpointing_runs_through_injected_stages(case: str) -> None:
    model = inject(_create(case), f"nonlocal@{CASES[case][3]}").train()
    x = _input(case)

    def grads() -> list[torch.Tensor]:
        model.zero_grad()
        model(x).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.set_grad_checkpointing(True)
    stage = model.get_submodule(CASES[case][4])
    assert stage.grad_checkpointing == (case == "convnext")  # ResNet checkpoints at model level
    for got, expected in zip(grads(), plain, strict=True):
        torch.testing.assert_close(got, expected)


def test_blocks_follow_the_stage_dtype_and_mode() -> None:
    model = _create("vit").double().eval()
    inject(model, "nonlocal@1")
    (block,) = _injected(model, NonLocalBlock)
    assert block.theta.weight.dtype == torch.float64 and not block.training
    assert model(_input("vit").double()).dtype == torch.float64


def test_inject_reports_the_model_stage_count() -> None:
    with pytest.raises(ValueError, match=r"has 4 stages.*layer4"):
        inject(_create("resnet"), "nonlocal@5")
    model = _create("resnet")
    with pytest.raises(TypeError, match="valid options"):
        inject(model, ["se@2", {"block": "nonlocal", "stage": 3, "bogus": 1}])
    assert not _injected(model, InjectedStage)  # nothing half-done


BLOCKS = ["nonlocal", "ppm", "se"]


def test_parse_spec_string_and_dicts() -> None:
    assert parse_spec(" nonlocal@3 , ppm@4 ", blocks=BLOCKS) == [
        Injection("nonlocal", 3),
        Injection("ppm", 4),
    ]
    spec = ["se@1", {"block": "nonlocal", "stage": 2, "sub_sample": 2}]
    assert parse_spec(spec, num_stages=4, blocks=BLOCKS) == [
        Injection("se", 1),
        Injection("nonlocal", 2, {"sub_sample": 2}),
    ]
    assert parse_spec(None) == [] and parse_spec("", blocks=BLOCKS) == []


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nonlocal", "BLOCK@STAGE"),
        ("nonlocal@x", "not an integer"),
        ("nonlocl@3", "valid blocks: nonlocal, ppm, se"),
        ("nonlocal@0", "out of range"),
        ("ppm@5", "the model has 4 stages"),
        ([{"block": "se"}], r"missing key\(s\) \['stage'\]"),
        ([{"block": "se", "stage": True}], "stage must be an integer"),
    ],
)
def test_parse_spec_errors(spec, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_spec(spec, num_stages=4, blocks=BLOCKS)
