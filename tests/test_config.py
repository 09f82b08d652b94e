"""The typed config: flags, recipes, precedence and errors."""

from __future__ import annotations

import dataclasses

import pytest

from cityseg.config import CONFIG_DIR, ConfigError, TrainConfig, build_parser, from_dict, parse_config
from cityseg.evaluation import EvalConfig


def test_every_field_is_a_flag_with_help():
    parser = build_parser(TrainConfig)
    actions = {a.dest: a for a in parser._actions}
    for f in dataclasses.fields(TrainConfig):
        assert f.name in actions, f.name
        assert f.metadata["help"] and actions[f.name].help.startswith(f.metadata["help"])
    for name in ("data_root", "out_dir", "max_iters", "batch_size", "crop_size", "width", "lr", "amp", "wandb",
                 "eval_every", "ckpt_every", "seed", "workers"):
        assert "--" + name.replace("_", "-") in actions[name].option_strings


def test_flags_override_recipe_override_defaults(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("width: 16\nlr: 1\nmax-iters: 50\n")
    cfg = parse_config(["--config", str(recipe), "--lr", "0.5", "--crop-size", "64x128"])
    assert cfg.width == 16 and cfg.max_iters == 50           # from the recipe (dash keys allowed)
    assert cfg.lr == 0.5 and cfg.crop_hw == (64, 128)        # flags win
    assert cfg.batch_size == TrainConfig().batch_size        # untouched default
    assert isinstance(cfg.lr, float)


@pytest.mark.parametrize("text, message", [
    ("widht: 16\n", "unknown key(s) widht"),
    ("width: sixteen\n", "width must be a int"),
    ("- 1\n", "expected a mapping"),
    ("width: [\n", "not valid YAML"),
])
def test_bad_recipes_are_one_line_errors(tmp_path, text, message):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    with pytest.raises(ConfigError, match=None) as e:
        parse_config(["--config", str(recipe)])
    assert message in str(e.value) and str(recipe) in str(e.value)


@pytest.mark.parametrize("argv, message", [
    (["--crop-size", "512"], "--crop-size must look like HxW"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--scale-min", "3"], "--scale-min"),
    (["--config", "/nonexistent.yaml"], "no such file"),
])
def test_bad_values(argv, message):
    with pytest.raises(ConfigError) as e:
        parse_config(argv)
    assert message in str(e.value)


def test_unknown_flag_exits():
    with pytest.raises(SystemExit):
        parse_config(["--not-a-flag", "1"])


@pytest.mark.parametrize("name", ["cityscapes_unet.yaml", "demo.yaml"])
def test_shipped_recipes_load(name):
    cfg = parse_config(["--config", str(CONFIG_DIR / name)])
    assert from_dict(cfg.to_dict()) == cfg


def test_reference_recipe_is_the_reference():
    cfg = parse_config(["--config", str(CONFIG_DIR / "cityscapes_unet.yaml")])
    assert (cfg.crop_hw, cfg.batch_size, cfg.max_iters, cfg.lr, cfg.width) == ((512, 1024), 4, 160_000, 0.01, 64)
    assert (cfg.optimizer, cfg.momentum, cfg.weight_decay, cfg.poly_power) == ("sgd", 0.9, 5e-4, 0.9)


def test_eval_config_requires_checkpoint():
    with pytest.raises(ConfigError, match="--checkpoint"):
        parse_config(["--data-root", "x"], EvalConfig)
