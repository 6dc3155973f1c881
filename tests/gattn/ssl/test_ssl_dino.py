"""DINO: EMA teacher without gradients, loss and centre by hand, schedules, CNN and ViT."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from torch import nn

import gattn.models  # noqa: F401  (registers gattn_vit_global)
from gattn.ssl.dino import DINO, DINOHead, MultiCropWrapper, dino_param_groups, momentum_schedule
from gattn.ssl.dino_loss import DINOLoss, collapse_stats
from gattn.ssl.schedules import warmup_cosine

K = 16
HEAD = {"out_dim": K, "hidden_dim": 24, "bottleneck_dim": 8, "nlayers": 3}


def tiny_backbone(kind: str) -> nn.Module:
    if kind == "vit":
        return timm.create_model(
            "gattn_vit_global",
            num_classes=0,
            img_size=32,
            patch_size=8,
            embed_dim=32,
            depth=2,
            num_heads=2,
            dynamic_img_size=True,
        )
    return timm.create_model(
        "resnet18", num_classes=0, layers=(1, 1, 1, 1), channels=(8, 16, 32, 32)
    )


def tiny_dino(kind: str = "vit", **kwargs) -> DINO:
    torch.manual_seed(0)
    return DINO(tiny_backbone(kind), tiny_backbone(kind), **{**HEAD, **kwargs})


def crops(batch: int = 2, n_local: int = 2) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return (
        [torch.rand(batch, 3, 32, 32) for _ in range(2)],
        [torch.rand(batch, 3, 16, 16) for _ in range(n_local)],
    )


@pytest.mark.parametrize("kind", ["vit", "cnn"])
def test_dino_trains_student_only_with_cnn_and_vit(kind: str) -> None:
    dino = tiny_dino(kind)
    teacher_sd = dino.teacher.state_dict()
    for t, s in zip(teacher_sd.values(), dino.student.state_dict().values(), strict=True):
        assert torch.equal(t, s)
    global_views, local_views = crops()
    student_out, teacher_out = dino(global_views, local_views)
    assert student_out.shape == (4 * 2, K) and teacher_out.shape == (2 * 2, K)
    assert not teacher_out.requires_grad
    loss, _ = DINOLoss(K, ncrops=4, nepochs=10)(student_out, teacher_out, epoch=0)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in dino.teacher.parameters())
    trainable = [p for p in dino.student.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)


def test_update_teacher_is_the_ema_formula() -> None:
    dino = tiny_dino()
    with torch.no_grad():
        for p in dino.student.parameters():
            p.add_(torch.randn_like(p))
    student = [p.detach().clone() for p in dino.student.parameters()]
    teacher = [p.detach().clone() for p in dino.teacher.parameters()]
    dino.update_teacher(0.9)
    for new, t, s in zip(dino.teacher.parameters(), teacher, student, strict=True):
        torch.testing.assert_close(new, 0.9 * t + 0.1 * s)


def test_multicrop_wrapper_runs_one_pass_per_resolution() -> None:
    torch.manual_seed(0)
    backbone = tiny_backbone("vit").eval()
    calls: list[int] = []
    backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    wrapper = MultiCropWrapper(backbone, DINOHead(32, K, 24, 8)).eval()
    global_views, local_views = crops(batch=2, n_local=3)
    out = wrapper([*global_views, *local_views])
    assert calls == [4, 6]
    one_by_one = torch.cat([wrapper.head(backbone(c)) for c in [*global_views, *local_views]])
    torch.testing.assert_close(out, one_by_one, rtol=1e-5, atol=1e-5)


def test_head_last_layer_is_weight_normalised() -> None:
    head = DINOHead(8, K, 24, 8, norm_last_layer=True)
    w = head.last_layer.weight
    torch.testing.assert_close(w.norm(dim=1), torch.ones(K))
    assert not head.last_layer.parametrizations.weight.original0.requires_grad
    free = DINOHead(8, K, norm_last_layer=False)
    assert free.last_layer.parametrizations.weight.original0.requires_grad


def hand_dino_loss(student: torch.Tensor, teacher: torch.Tensor, ncrops: int, tt: float) -> float:
    """Algorithm 1 of the paper with explicit loops over view pairs and images."""
    b = student.shape[0] // ncrops
    n_global = teacher.shape[0] // b
    terms = []
    for g in range(n_global):
        for v in range(ncrops):
            if v == g:
                continue
            per_image = []
            for i in range(b):
                t = teacher[g * b + i].tolist()
                s = student[v * b + i].tolist()
                zt = sum(math.exp(x / tt) for x in t)
                zs = sum(math.exp(x / 0.1) for x in s)
                per_image.append(
                    -sum(
                        math.exp(ti / tt) / zt * (si / 0.1 - math.log(zs))
                        for ti, si in zip(t, s, strict=True)
                    )
                )
            terms.append(sum(per_image) / b)
    return sum(terms) / len(terms)


def test_dino_loss_matches_hand_computed_cross_entropy() -> None:
    torch.manual_seed(0)
    ncrops, b = 4, 3
    student = torch.randn(ncrops * b, K)
    teacher = student[: 2 * b].clone()  # identical outputs on the global crops
    loss_fn = DINOLoss(K, ncrops, 0.04, 0.07, 5, 20).eval()
    loss, stats = loss_fn(student, teacher, epoch=10)
    assert loss.item() == pytest.approx(hand_dino_loss(student, teacher, ncrops, 0.07), rel=1e-5)
    assert stats["teacher_temp"].item() == pytest.approx(0.07)
    assert torch.equal(loss_fn.center, torch.zeros(1, K))  # eval mode: centre untouched


def test_center_update_formula() -> None:
    loss_fn = DINOLoss(K, ncrops=2, center_momentum=0.8).train()
    t1, t2 = torch.randn(6, K), torch.randn(6, K)
    loss_fn(torch.randn(6, K), t1, epoch=0)
    torch.testing.assert_close(loss_fn.center, 0.2 * t1.mean(0, keepdim=True))
    loss_fn(torch.randn(6, K), t2, epoch=0)
    expected = 0.8 * 0.2 * t1.mean(0, keepdim=True) + 0.2 * t2.mean(0, keepdim=True)
    torch.testing.assert_close(loss_fn.center, expected)


def test_loss_uses_the_center() -> None:
    student, teacher = torch.randn(8, K), torch.randn(4, K)
    loss_fn = DINOLoss(K, ncrops=4).eval()
    plain = loss_fn(student, teacher, 0)[0]
    loss_fn.center.copy_(torch.randn(1, K))
    shifted = loss_fn(student, teacher + loss_fn.center, 0)[0]
    torch.testing.assert_close(shifted, plain)


def test_teacher_temperature_warms_up_linearly_then_stays() -> None:
    loss_fn = DINOLoss(
        K, 4, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=10, nepochs=30
    )
    temps = [loss_fn.teacher_temp(e) for e in range(30)]
    assert temps[0] == pytest.approx(0.04)
    assert temps[5] == pytest.approx(0.055)
    assert all(t == pytest.approx(0.07) for t in temps[10:])
    assert all(a < b for a, b in zip(temps[:10], temps[1:11], strict=True))


def test_collapse_stats_for_uniform_and_one_hot_outputs() -> None:
    uniform = collapse_stats(torch.full((5, K), 1.0 / K))
    assert uniform["teacher_entropy"].item() == pytest.approx(math.log(K), rel=1e-6)
    assert uniform["teacher_kl_to_mean"].item() == pytest.approx(0.0, abs=1e-6)
    one_hot = collapse_stats(torch.eye(4, K))  # 4 different one-hot outputs
    assert one_hot["teacher_entropy"].item() == pytest.approx(0.0, abs=1e-6)
    assert one_hot["teacher_kl_to_mean"].item() == pytest.approx(math.log(4), rel=1e-6)
    # Through the loss: constant teacher logits give uniform targets.
    _, stats = DINOLoss(K, 4).eval()(torch.randn(8, K), torch.zeros(4, K), 0)
    assert stats["teacher_entropy"].item() == pytest.approx(math.log(K), rel=1e-6)


def test_momentum_schedule_rises_from_base_towards_final() -> None:
    m = momentum_schedule(0.996, 1.0, 100)
    assert m.shape == (100,)
    assert m[0].item() == pytest.approx(0.996)
    assert bool((m[1:] > m[:-1]).all()) and bool((m < 1.0).all())
    assert m[50].item() == pytest.approx(0.998)
    assert warmup_cosine(100, 100, 0.996, 1.0) == pytest.approx(1.0)


def test_loss_rejects_mismatched_crops() -> None:
    with pytest.raises(ValueError):
        DINOLoss(K, ncrops=4)(torch.randn(7, K), torch.randn(4, K), 0)


def test_param_groups_decay_weights_not_biases_norms_or_the_teacher() -> None:
    dino = tiny_dino(use_bn=True)
    decay, no_decay = dino_param_groups(dino, 0.04)
    assert decay["weight_decay"] == 0.04 and no_decay["weight_decay"] == 0.0
    trainable = {id(p) for p in dino.student.parameters() if p.requires_grad}
    grouped = [id(p) for p in [*decay["params"], *no_decay["params"]]]
    assert sorted(grouped) == sorted(trainable)  # each student parameter once, no teacher one
    assert all(p.ndim >= 2 for p in decay["params"])
    names = {id(p): n for n, p in dino.named_parameters()}
    assert all(names[id(p)].endswith(".bias") or p.ndim == 1 for p in no_decay["params"])
    assert any("norm" in names[id(p)] for p in no_decay["params"])


def test_cancel_last_layer_gradients_leaves_the_rest() -> None:
    dino = tiny_dino()
    student_out, teacher_out = dino(*crops())
    DINOLoss(K, ncrops=4)(student_out, teacher_out, 0)[0].backward()
    dino.cancel_last_layer_gradients()
    last = {id(p) for p in dino.student.head.last_layer.parameters()}
    for p in dino.student.parameters():
        if p.requires_grad:
            assert (p.grad is None) == (id(p) in last)
