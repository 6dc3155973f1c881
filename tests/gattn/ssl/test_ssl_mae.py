"""MAE: masking, patch round trips, visible-only encoding, masked-only loss, learning, figure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import gattn.models  # noqa: F401  (registers gattn_vit_global)
from gattn.ssl.mae import MaskedAutoencoder, patchify, random_masking, unpatchify
from gattn.ssl.reconstruction import reconstruct, reconstruction_figure

IMG, PATCH = 32, 8
N = (IMG // PATCH) ** 2

ENCODERS = {
    "no_prefix": {},
    "dynamic_img_size": {"dynamic_img_size": True},
    "cls": {"class_token": True, "global_pool": "token"},
    "cls_reg_no_embed_class": {
        "class_token": True,
        "reg_tokens": 2,
        "no_embed_class": True,
        "global_pool": "token",
    },
}


def tiny_vit(**kwargs) -> torch.nn.Module:
    args = {"img_size": IMG, "patch_size": PATCH, "embed_dim": 32, "depth": 2, "num_heads": 2}
    return timm.create_model("gattn_vit_global", num_classes=0, **{**args, **kwargs})


def tiny_mae(encoder_kwargs: dict | None = None, **kwargs) -> MaskedAutoencoder:
    torch.manual_seed(0)
    args = {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2, **kwargs}
    return MaskedAutoencoder(tiny_vit(**(encoder_kwargs or {})), **args)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("ratio", [0.75, 0.6, 0.5])
def test_random_masking_keeps_round_share_per_sample_and_restores_order(ratio: float) -> None:
    b, n, d = 4, 64, 3  # C(64, 16) masks: a repeat between samples would be a bug
    x = torch.arange(b * n * d, dtype=torch.float32).reshape(b, n, d)
    kept, mask, ids_restore = random_masking(x, ratio, gen())
    keep = round(n * (1 - ratio))
    assert kept.shape == (b, keep, d)
    assert mask.shape == (b, n)
    assert torch.equal(mask.sum(1), torch.full((b,), float(n - keep)))
    assert len({tuple(m.tolist()) for m in mask}) == b  # a different mask per sample
    for i in range(b):
        visible = x[i][mask[i] == 0]
        assert torch.equal(kept[i][kept[i][:, 0].argsort()], visible)
    # ids_restore undoes the shuffle: [kept, masked] gathered by it is the original sequence.
    ids_shuffle = ids_restore.argsort(dim=1)
    shuffled = x.gather(1, ids_shuffle[..., None].expand(-1, -1, d))
    assert torch.equal(shuffled[:, :keep], kept)
    assert torch.equal(shuffled.gather(1, ids_restore[..., None].expand(-1, -1, d)), x)


def test_random_masking_rejects_ratio_that_keeps_nothing() -> None:
    with pytest.raises(ValueError):
        random_masking(torch.zeros(1, 4, 2), 0.9)


def test_patchify_matches_slicing_and_unpatchify_inverts_it() -> None:
    imgs = torch.randn(2, 3, 16, 24)
    patches = patchify(imgs, 8)
    assert patches.shape == (2, 2 * 3, 8 * 8 * 3)
    for gy in range(2):
        for gx in range(3):
            block = imgs[1, :, gy * 8 : (gy + 1) * 8, gx * 8 : (gx + 1) * 8]
            assert torch.equal(patches[1, gy * 3 + gx], block.permute(1, 2, 0).flatten())
    assert torch.equal(unpatchify(patches, 8, (2, 3), 3), imgs)


def test_norm_pix_target_is_per_patch_standardised() -> None:
    mae = tiny_mae(norm_pix_loss=True)
    imgs = torch.rand(2, 3, IMG, IMG)
    target = mae.target(imgs).numpy()
    raw = patchify(imgs, PATCH).numpy().astype(np.float64)
    mean = raw.mean(-1, keepdims=True)
    var = raw.var(-1, ddof=1, keepdims=True)
    np.testing.assert_allclose(target, (raw - mean) / np.sqrt(var + 1e-6), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(ENCODERS))
def test_encoder_runs_blocks_on_visible_tokens_only(name: str) -> None:
    mae = tiny_mae(ENCODERS[name])
    seen: list[tuple[int, ...]] = []
    mae.encoder.blocks[0].register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    mae(torch.rand(3, 3, IMG, IMG))
    keep = round(N * 0.25)
    assert seen == [(3, mae.encoder.num_prefix_tokens + keep, 32)]


@pytest.mark.parametrize("name", list(ENCODERS))
def test_unmasked_encoding_equals_timm_forward_features(name: str) -> None:
    """Attention is permutation-equivariant once positions are embedded, so with nothing
    masked the shuffled visible-only path must reproduce timm's own forward, prefix included."""
    mae = tiny_mae(ENCODERS[name]).eval()
    imgs = torch.rand(2, 3, IMG, IMG)
    latent, mask, ids_restore = mae.forward_encoder(imgs, mask_ratio=0.0, generator=gen(5))
    assert not mask.any()
    n_prefix = mae.encoder.num_prefix_tokens
    patches = latent[:, n_prefix:].gather(1, ids_restore[..., None].expand(-1, -1, 32))
    reference = mae.encoder.forward_features(imgs)
    torch.testing.assert_close(latent[:, :n_prefix], reference[:, :n_prefix])
    torch.testing.assert_close(patches, reference[:, n_prefix:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(ENCODERS))
def test_masked_pixels_do_not_reach_the_encoder(name: str) -> None:
    mae = tiny_mae(ENCODERS[name]).eval()
    imgs = torch.rand(2, 3, IMG, IMG)
    latent, mask, _ = mae.forward_encoder(imgs, generator=gen(1))
    pixel_mask = unpatchify(mask[..., None].expand(-1, -1, PATCH * PATCH), PATCH, 4, 1)
    noise = 5 * torch.randn_like(imgs)
    masked_changed, _, _ = mae.forward_encoder(imgs + noise * pixel_mask, generator=gen(1))
    torch.testing.assert_close(masked_changed, latent)
    visible_changed, _, _ = mae.forward_encoder(imgs + noise * (1 - pixel_mask), generator=gen(1))
    assert not torch.allclose(visible_changed, latent, atol=1e-3)


def test_loss_counts_masked_patches_only() -> None:
    mae = tiny_mae()
    imgs = torch.rand(2, 3, IMG, IMG)
    loss, pred, mask = mae(imgs, generator=gen(2))
    assert pred.shape == (2, N, PATCH * PATCH * 3)
    err = ((pred - patchify(imgs, PATCH)) ** 2).mean(-1)
    torch.testing.assert_close(loss, err[mask == 1].mean())
    visible = (1 - mask)[..., None]
    moved_visible = pred + 3 * torch.randn_like(pred) * visible
    torch.testing.assert_close(mae.loss(imgs, moved_visible, mask), loss)
    moved_masked = pred + 3 * torch.randn_like(pred) * (1 - visible)
    assert not torch.allclose(mae.loss(imgs, moved_masked, mask), loss)


def test_mae_learns_on_a_fixed_batch() -> None:
    mae = tiny_mae(norm_pix_loss=False)
    imgs = torch.rand(4, 3, IMG, IMG)
    opt = torch.optim.AdamW(mae.parameters(), lr=2e-3)
    with torch.no_grad():
        before = mae(imgs, generator=gen(3))[0].item()
    for step in range(30):
        loss = mae(imgs, generator=gen(100 + step))[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = mae(imgs, generator=gen(3))[0].item()
    assert after < 0.7 * before


@pytest.mark.parametrize("name", list(ENCODERS))
def test_every_trainable_parameter_gets_a_gradient(name: str) -> None:
    """DDP fails on parameters that never get a gradient: MAE freezes the unused pooling."""
    mae = tiny_mae(ENCODERS[name])
    mae(torch.rand(2, 3, IMG, IMG), generator=gen())[0].backward()
    missing = [n for n, p in mae.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert not any(p.requires_grad for p in mae.encoder.fc_norm.parameters())


def test_encoder_state_dict_loads_into_the_same_timm_model() -> None:
    mae = tiny_mae()
    fresh = tiny_vit()
    fresh.load_state_dict(mae.encoder_state_dict())
    x = torch.rand(1, 3, IMG, IMG)
    torch.testing.assert_close(fresh.eval()(x), mae.encoder.eval()(x))


def test_reconstruct_pastes_visible_and_undoes_norm_pix() -> None:
    imgs = torch.rand(2, 3, IMG, IMG)
    mae = tiny_mae(norm_pix_loss=True)
    _, mask, _ = mae.forward_encoder(imgs, generator=gen(4))
    # A perfect norm-pix prediction maps back to the input exactly.
    _, prediction, recon = reconstruct(imgs, mae.target(imgs), mask, norm_pix_loss=True)
    torch.testing.assert_close(prediction, imgs, rtol=1e-4, atol=1e-4)
    # Any prediction: the input on visible patches, the prediction on masked ones.
    pred = torch.randn(2, N, PATCH * PATCH * 3)
    pixel_mask, prediction, recon = reconstruct(imgs, pred, mask)
    assert torch.equal(prediction, unpatchify(pred, PATCH, 4, 3))
    hidden = pixel_mask.expand_as(imgs).bool()
    assert torch.equal(recon[hidden], prediction[hidden])
    assert torch.equal(recon[~hidden], imgs[~hidden])


def test_reconstruction_figure_writes_a_png_atomically(tmp_path: Path) -> None:
    mae = tiny_mae()
    imgs = torch.rand(3, 3, IMG, IMG)
    with torch.no_grad():
        _, pred, mask = mae(imgs)
    path = reconstruction_figure(imgs, pred, mask, tmp_path / "recon.png", max_images=2)
    assert path == tmp_path / "recon.png"
    with Image.open(path) as im:
        assert im.format == "PNG"
        width, height = im.size
    assert width > height  # 3 columns, 2 rows
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recon.png"]
