"""Every registry entry is a drop-in block for a (B, C, H, W) map returning the same shape."""

from __future__ import annotations

import pytest
import torch

from gattn import modules

EXPECTED = {
    "global_attn",
    "global_tokens",
    "window_attn",
    "shifted_window_attn",
    "nonlocal",
    "large_kernel",
    "dilated",
    "ppm",
    "aspp",
    "se",
    "cbam",
}
C = 32


def test_registry_has_every_block_of_the_design() -> None:
    assert set(modules.available()) >= EXPECTED


def test_unknown_name_lists_valid_ones() -> None:
    with pytest.raises(KeyError, match="available: .*nonlocal"):
        modules.create("non-local", C)


def test_unknown_option_lists_valid_ones() -> None:
    with pytest.raises(TypeError, match="valid options"):
        modules.create("se", C, no_such_option=3)


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("size", [(8, 8), (37, 53)])
@pytest.mark.parametrize("batch", [1, 2])
def test_block_is_a_drop_in(name: str, size: tuple[int, int], batch: int) -> None:
    torch.manual_seed(0)
    block = modules.create(name, C)
    x = torch.randn(batch, C, *size, requires_grad=True)

    block.train()
    y = block(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()
    y.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    trainable = [p for p in block.parameters() if p.requires_grad]
    assert trainable, f"{name} has no trainable parameters"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable), (
        f"no parameter of {name} received a gradient"
    )

    block.eval()
    with torch.no_grad():
        y_eval = block(x)
    assert y_eval.shape == x.shape and torch.isfinite(y_eval).all()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_block_is_deterministic_in_eval(name: str) -> None:
    block = modules.create(name, C).eval()
    x = torch.randn(2, C, 9, 11)
    with torch.no_grad():
        torch.testing.assert_close(block(x), block(x))
