import json

import pytest
import torch

from gattn.models import build_model, load_model, read_config, save_model

CFG = {"task": "seg", "backbone": "gattn_local_cnn", "num_classes": 3, "inject": "nonlocal@2"}


def test_save_load_roundtrip_gives_same_outputs(tmp_path):
    torch.manual_seed(0)
    model = build_model(CFG).eval()
    save_model(model, CFG, tmp_path / "m", classes=["bg", "a", "b"], img_size=64)
    loaded, cfg = load_model(tmp_path / "m")
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert cfg["classes"] == ["bg", "a", "b"] and cfg["model"] == CFG
    assert not list((tmp_path / "m").glob(".*tmp"))  # no temporaries left


def test_not_a_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        read_config(tmp_path)


def test_weights_that_do_not_match_the_config_are_refused(tmp_path):
    save_model(build_model(CFG), CFG, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model"]["inject"] = None  # the saved weights hold a non-local block
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RuntimeError, match="Unexpected key"):
        load_model(tmp_path)
