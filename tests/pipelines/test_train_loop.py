"""The shared training loop's per-epoch progress line: what a person watching a stage reads."""

from __future__ import annotations

from pipelines.train.loop import progress_line


def test_progress_line_shows_the_epoch_and_its_figures_but_not_bookkeeping() -> None:
    row = {
        "epoch": 3,
        "start_epoch": 1,
        "train_loss": 0.079355566,
        "val_miou": 0.78232957,
        "lr": 0.0026669,
        "images_per_s": 10.2956,
        "note": "not a number",
    }
    line = progress_line("finetune", row, epochs=12, seconds=47.4)
    assert line == (
        "finetune: epoch 3/12 in 47 s: train_loss=0.07936 val_miou=0.7823 lr=0.002667 "
        "images_per_s=10.3"
    )
