"""Class weights for the segmentation loss (shared by tune and finetune)."""

import torch

from pipelines.metrics import class_counts, class_weights


def test_class_weights_are_inverse_sqrt_frequency_with_unit_mean_per_target():
    # 90 background pixels, 9 of class 1, 1 of class 2; class 3 absent; 255 ignored.
    y = torch.tensor([0] * 90 + [1] * 9 + [2] * 1 + [255] * 7)
    w = class_weights(class_counts(y, 4))
    freq = torch.tensor([0.90, 0.09, 0.01])
    expected = freq.rsqrt() / (freq.rsqrt() * freq).sum()
    torch.testing.assert_close(w[:3], expected)
    assert w[3] == w.max()  # an absent class gets the largest weight
    torch.testing.assert_close((w[:3] * freq).sum(), torch.tensor(1.0))


def test_class_counts_of_batches_add_up_to_the_whole():
    y = torch.tensor([[0, 1, 255], [2, 2, 0]])
    whole = class_counts(y, 3)
    torch.testing.assert_close(class_counts(y[:1], 3) + class_counts(y[1:], 3), whole)
    assert whole.tolist() == [2, 1, 2]
