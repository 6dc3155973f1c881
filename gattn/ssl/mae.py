"""Masked autoencoder pre-training for timm Vision Transformers.

He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022
(https://arxiv.org/abs/2111.06377): mask a large random subset of patches per image, run the
encoder on the visible patches only (which is what makes pre-training ~3x cheaper than
encoding every patch), and let a light decoder rebuild the masked patches from the encoded
visible ones plus a shared learned mask token; the loss is the pixel MSE on masked patches.

The article's ``MaskedAutoEncoder`` shuffled already-embedded tokens and handed them to an
opaque encoder and decoder; here the encoder is any timm ``VisionTransformer`` (for example
``gattn_vit_global``), masked after its own patch and position embedding and before its
prefix (class/register) tokens and blocks, so the pre-trained weights load back into the same
timm model unchanged (:meth:`MaskedAutoencoder.encoder_state_dict`).
"""

from __future__ import annotations

import functools

import torch
from timm.layers import build_sincos2d_pos_embed, to_2tuple
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

__all__ = [
    "MaskedAutoencoder",
    "masked_mse",
    "normalize_patches",
    "patchify",
    "random_masking",
    "unpatchify",
]

PatchSize = int | tuple[int, int]


def patchify(imgs: torch.Tensor, patch_size: PatchSize) -> torch.Tensor:
    """Images ``(B, C, H, W)`` to patches ``(B, N, ph * pw * C)``, row-major over the grid.

    Each patch is flattened as ``(ph, pw, C)`` (channels last), as in the MAE reference code.
    """
    ph, pw = to_2tuple(patch_size)
    b, c, h, w = imgs.shape
    if h % ph or w % pw:
        raise ValueError(f"image size {(h, w)} is not a multiple of the patch size {(ph, pw)}")
    x = imgs.reshape(b, c, h // ph, ph, w // pw, pw)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // ph) * (w // pw), ph * pw * c)


def unpatchify(
    patches: torch.Tensor, patch_size: PatchSize, grid_size: PatchSize, in_chans: int = 3
) -> torch.Tensor:
    """The inverse of :func:`patchify`: ``(B, N, ph * pw * C)`` to ``(B, C, H, W)``."""
    ph, pw = to_2tuple(patch_size)
    gh, gw = to_2tuple(grid_size)
    b, n, d = patches.shape
    if n != gh * gw or d != ph * pw * in_chans:
        raise ValueError(
            f"patches {tuple(patches.shape)} do not fit grid {(gh, gw)}, "
            f"patch {(ph, pw)} and {in_chans} channels"
        )
    x = patches.reshape(b, gh, gw, ph, pw, in_chans)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, in_chans, gh * ph, gw * pw)


def normalize_patches(
    patches: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-patch standardisation, MAE's ``norm_pix_loss`` target.

    Returns:
        ``(normalised, mean, std)`` with ``std = sqrt(var + eps)`` (unbiased variance, as in
        the reference code), so ``normalised * std + mean`` gives the patches back.
    """
    mean = patches.mean(dim=-1, keepdim=True)
    std = (patches.var(dim=-1, keepdim=True) + eps).sqrt()
    return (patches - mean) / std, mean, std


def random_masking(
    x: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep a random ``round(N * (1 - mask_ratio))`` tokens of every sample, independently.

    Args:
        x: Tokens ``(B, N, D)``.
        mask_ratio: Fraction of tokens to mask, in ``[0, 1)``.
        generator: Random generator for the shuffle (on ``x``'s device).

    Returns:
        ``(kept, mask, ids_restore)``: the kept tokens ``(B, N_keep, D)`` in shuffled order,
        ``mask`` ``(B, N)`` with 1 for masked and 0 for kept tokens in the original order, and
        ``ids_restore`` ``(B, N)``, the permutation that puts ``[kept, masked]`` back in order.
    """
    b, n, d = x.shape
    keep = round(n * (1.0 - mask_ratio))
    if not 0.0 <= mask_ratio < 1.0 or keep < 1:
        raise ValueError(f"mask_ratio={mask_ratio} must keep at least one of {n} tokens")
    noise = torch.rand(b, n, device=x.device, generator=generator)
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    kept = x.gather(1, ids_shuffle[:, :keep, None].expand(-1, -1, d))
    mask = torch.ones(b, n, device=x.device, dtype=x.dtype)
    mask[:, :keep] = 0
    return kept, mask.gather(1, ids_restore), ids_restore


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked patches of the per-patch mean squared error.

    Args:
        pred: Predicted patches ``(B, N, P)``.
        target: Target patches ``(B, N, P)``.
        mask: ``(B, N)``, 1 for patches that count (masked), 0 for ignored ones; with no
            masked patch the loss is 0.
    """
    per_patch = (pred - target).pow(2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum().clamp_min(1)


class MaskedAutoencoder(nn.Module):
    """A timm ViT encoder on visible patches + a light Transformer decoder with mask tokens.

    Args:
        encoder: A timm ``VisionTransformer`` (e.g. ``timm.create_model("gattn_vit_global",
            num_classes=0)``); its patch and position embedding, prefix tokens, blocks and
            final norm are used and trained; its pooling norm and head are not (they are
            frozen).
        decoder_dim: Width of the decoder (a multiple of 4, for its 2-D sin-cos positions).
        decoder_depth: Number of decoder blocks.
        decoder_heads: Attention heads per decoder block.
        mask_ratio: Fraction of patches masked per image.
        norm_pix_loss: Regress per-patch standardised pixels (:func:`normalize_patches`).
        mlp_ratio: Hidden width of the decoder MLPs, relative to ``decoder_dim``.
        norm_layer: Normalisation layer of the decoder.
    """

    decoder_pos_embed: torch.Tensor  # non-persistent buffer

    def __init__(
        self,
        encoder: VisionTransformer,
        decoder_dim: int = 128,
        decoder_depth: int = 2,
        decoder_heads: int = 4,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = False,
        mlp_ratio: float = 4.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        if not isinstance(encoder, VisionTransformer):
            raise TypeError(f"encoder must be a timm VisionTransformer, got {type(encoder)}")
        self.encoder = encoder
        # MAE trains no pooling or classifier: freeze them, so data-parallel training (DDP)
        # does not wait for gradients that never come.
        for name in ("attn_pool", "fc_norm", "head"):
            part = getattr(encoder, name, None)
            if isinstance(part, nn.Module):
                part.requires_grad_(False)
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.patch_size: tuple[int, int] = to_2tuple(encoder.patch_embed.patch_size)
        self.grid_size: tuple[int, int] = to_2tuple(encoder.patch_embed.grid_size)
        self.in_chans = encoder.patch_embed.proj.in_channels
        ph, pw = self.patch_size

        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        block = functools.partial(
            Block,
            decoder_dim,
            decoder_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=True,
            norm_layer=norm_layer,
        )
        self.decoder_blocks = nn.Sequential(*(block() for _ in range(decoder_depth)))
        self.decoder_norm = norm_layer(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, ph * pw * self.in_chans)
        pos = build_sincos2d_pos_embed(list(self.grid_size), decoder_dim)
        self.register_buffer("decoder_pos_embed", pos.unsqueeze(0), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """MAE's decoder initialisation: xavier-uniform linears, N(0, 0.02) mask token."""
        nn.init.normal_(self.mask_token, std=0.02)
        for m in (self.decoder_embed, self.decoder_pred, self.decoder_blocks, self.decoder_norm):
            m.apply(_init_weights)

    def _embed_patches(self, imgs: torch.Tensor) -> torch.Tensor:
        """Patch embedding plus the patches' share of the encoder's position embedding."""
        enc = self.encoder
        x = enc.patch_embed(imgs)
        if x.ndim == 4:  # dynamic_img_size encoders keep the grid (B, H, W, D)
            if tuple(x.shape[1:3]) != self.grid_size:
                raise ValueError(f"MAE needs the {self.grid_size} patch grid, got {x.shape[1:3]}")
            x = x.flatten(1, 2)
        if enc.pos_embed is not None:
            x = x + enc.pos_embed[:, -x.shape[1] :]
        return x

    def _prefix_tokens(self, batch: int) -> torch.Tensor | None:
        """Class and register tokens, with their position embedding where the encoder has it."""
        enc = self.encoder
        tokens = [t.expand(batch, -1, -1) for t in (enc.cls_token, enc.reg_token) if t is not None]
        if not tokens:
            return None
        prefix = torch.cat(tokens, dim=1)
        if enc.pos_embed is not None and not enc.no_embed_class:
            prefix = prefix + enc.pos_embed[:, : enc.num_prefix_tokens]
        return prefix

    def forward_encoder(
        self,
        imgs: torch.Tensor,
        mask_ratio: float | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode the visible patches only.

        Returns:
            ``(latent, mask, ids_restore)``: latent ``(B, prefix + N_keep, D)`` with the
            prefix tokens first, and the outputs of :func:`random_masking`.
        """
        enc = self.encoder
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        x, mask, ids_restore = random_masking(self._embed_patches(imgs), ratio, generator)
        prefix = self._prefix_tokens(x.shape[0])
        if prefix is not None:
            x = torch.cat([prefix, x], dim=1)
        x = enc.norm_pre(enc.pos_drop(x))
        return enc.norm(enc.blocks(x)), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Predict every patch ``(B, N, ph * pw * C)`` from the latent and mask tokens."""
        n_prefix = self.encoder.num_prefix_tokens
        x = self.decoder_embed(latent)
        prefix, visible = x[:, :n_prefix], x[:, n_prefix:]
        b, n = ids_restore.shape
        masked = self.mask_token.expand(b, n - visible.shape[1], -1)
        x = torch.cat([visible, masked], dim=1)
        x = x.gather(1, ids_restore[..., None].expand(-1, -1, x.shape[-1]))
        x = torch.cat([prefix, x + self.decoder_pos_embed], dim=1)
        x = self.decoder_norm(self.decoder_blocks(x))
        return self.decoder_pred(x[:, n_prefix:])

    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        """The regression target: patches of ``imgs``, standardised if ``norm_pix_loss``."""
        patches = patchify(imgs, self.patch_size)
        return normalize_patches(patches)[0] if self.norm_pix_loss else patches

    def loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """MSE between ``pred`` and :meth:`target` on masked patches only."""
        return masked_mse(pred, self.target(imgs), mask)

    def forward(
        self,
        imgs: torch.Tensor,
        mask_ratio: float | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mask, encode, decode.

        Args:
            imgs: Images ``(B, C, H, W)`` at the encoder's size.
            mask_ratio: Overrides the module's ratio for this call.
            generator: Random generator for the masks.

        Returns:
            ``(loss, pred, mask)``: the scalar loss, predicted patches ``(B, N, ph * pw * C)``
            and the mask ``(B, N)`` (1 = masked).
        """
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, generator)
        pred = self.forward_decoder(latent, ids_restore)
        return self.loss(imgs, pred, mask), pred, mask

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights, loadable into the same timm model (``load_state_dict``)."""
        return self.encoder.state_dict()


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
