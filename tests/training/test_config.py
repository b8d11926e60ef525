"""Training configuration: profiles, config files and overrides that are type-checked and refuse unknown keys."""

from __future__ import annotations

import pytest

from genserve.training.config import build_config


def test_profile_then_file_then_overrides(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('lr = 0.01\nepochs = 3\n[arch]\nlatent_dim = 4\n')
    cfg = build_config("ppca", config_file=f, overrides={"epochs": "5", "arch.latent_dim": "6"})
    assert (cfg.lr, cfg.epochs, cfg.arch["latent_dim"]) == (0.01, 5, 6)
    assert build_config("ppca", "moons").arch["latent_dim"] == 1  # tabular profile


@pytest.mark.parametrize(
    "overrides, msg",
    [
        ({"learning_rate": "1"}, "unknown setting 'learning_rate'"),
        ({"epochs": "many"}, "expected int"),
        ({"epochs": "2.5"}, "expected int"),
        ({"lr": "-1"}, "lr must be > 0"),
        ({"profile": "huge"}, "unknown profile"),
    ],
)
def test_bad_overrides_are_refused(overrides, msg):
    with pytest.raises(ValueError, match=msg):
        build_config("ppca", overrides=overrides)


def test_unknown_model_and_bad_file(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'pixelcnn'; choose one of: arcnn"):
        build_config("pixelcnn")
    f = tmp_path / "c.json"
    f.write_text('{"epoch": 3}')
    with pytest.raises(ValueError, match="unknown setting 'epoch'"):
        build_config("ppca", config_file=f)
