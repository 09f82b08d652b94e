"""The typed configs: flags, recipes, precedence, and one clear line for every bad value of every field."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import yaml

from cityseg.config import CONFIG_DIR, ConfigError, EvalConfig, TrainConfig, build_parser, from_dict, parse_config
from conftest import REPO, entry_point, run_main

ROOT = ["--data-root", "/data/cityscapes"]


def test_every_field_is_a_flag_with_help():
    for cls in (TrainConfig, EvalConfig):
        parser = build_parser(cls)
        text = parser.format_help()  # what --help prints
        actions = {a.dest: a for a in parser._actions}
        for f in dataclasses.fields(cls):
            assert f.name in actions, f.name
            assert f.metadata["help"] and actions[f.name].help.replace("%%", "%").startswith(f.metadata["help"])
            assert actions[f.name].option_strings[0] == "--" + f.name.replace("_", "-")
            assert "--" + f.name.replace("_", "-") in text


def test_flags_override_recipe_override_defaults(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("width: 16\nlr: 1\nmax-iters: 50\n")
    cfg = parse_config([*ROOT, "--config", str(recipe), "--lr", "0.5", "--crop-size", "64x128"])
    assert cfg.width == 16 and cfg.max_iters == 50           # from the recipe (dash keys allowed)
    assert cfg.lr == 0.5 and cfg.crop_hw == (64, 128)        # flags win
    assert cfg.batch_size == TrainConfig().batch_size        # untouched default
    assert isinstance(cfg.lr, float)


@pytest.mark.parametrize("name", ["cityscapes_unet.yaml", "cityscapes_unet_ohem.yaml", "demo.yaml"])
def test_shipped_recipes_load(name):
    cfg = parse_config([*ROOT, "--config", str(CONFIG_DIR / name)])
    assert from_dict(cfg.to_dict()) == cfg


def test_reference_recipe_is_the_reference():
    cfg = parse_config([*ROOT, "--config", str(CONFIG_DIR / "cityscapes_unet.yaml")])
    assert (cfg.crop_hw, cfg.batch_size, cfg.max_iters, cfg.lr, cfg.width) == ((512, 1024), 4, 160_000, 0.01, 64)
    assert (cfg.optimizer, cfg.momentum, cfg.weight_decay, cfg.poly_power) == ("sgd", 0.9, 5e-4, 0.9)


# -- the sweep: every field, a bad value of every kind, through the real entry points --------------------------
LIST = [1, 2]  # the wrong type for every field, in a recipe
# Bad command-line values of each field: wrong type, out of range, empty. String fields that take any text
# (paths, names) have none; their wrong type is tried in a recipe like every other field's.
TRAIN_BAD = {
    "data_root": [""], "train_split": ["", "a/b"], "val_split": ["", "../val"], "cache_dir": [],
    "crop_size": ["512", "8x8", "0x64", "", "axb"], "scale_min": ["0", "-1", "nan", "x", "", "3"],
    "scale_max": ["0", "inf", "9"], "cat_max_ratio": ["0", "1.5", "-0.1", "x"], "photometric": ["strong", ""],
    "batch_size": ["0", "-1", "2.5", ""], "workers": ["-1", "x"], "width": ["0", "x"],
    "model": ["resnet50", "unet_vit", ""], "decoder_channels": ["256,128", "0,1,2,3,4", "a,b,c,d,e", ""],
    "encoder_weights": [""], "init_from": [], "decay_norm_bias": ["=3"], "encoder_lr_mult": ["-1", "nan"],
    "ema_decay": ["1", "-0.1", "x"],
    "aux_weight": ["-1", "nan", ""], "loss": ["focal", ""], "ohem_thresh": ["0", "1.5", "x"],
    "ohem_min_kept": ["-1", "1.5"], "max_iters": ["0", "-5", "1e3"], "accum_steps": ["0", ""],
    "compile": ["=3"], "deterministic": ["=yes"], "optimizer": ["adam", ""], "lr": ["-1", "0", "nan", "inf", "abc", ""],
    "min_lr": ["-1", "1"], "momentum": ["1", "-0.1", "1.5"], "weight_decay": ["-1", "inf"],
    "warmup_iters": ["-1", "x"], "warmup_factor": ["-0.5", "2"], "poly_power": ["-1", "nan"],
    "amp": ["fp8", ""], "out_dir": [""], "seed": ["-1", str(2**32), "1.5"], "device": ["tpu", ""],
    "eval_every": ["-1"], "ckpt_every": ["-1"], "keep_ckpts": ["0"], "log_every": ["0"],
    "max_val_images": ["-1"], "num_pictures": ["-1"], "wandb": ["maybe", ""], "wandb_project": [""],
    "wandb_entity": [], "run_name": [], "stall_timeout": ["-1", "nan", "x"], "drop_path": ["1", "-0.1", "x"],
    "layer_decay": ["0", "1.5", "x"], "layer_decay_num_layers": ["3", "x"],
}
EVAL_BAD = {
    "checkpoint": [""], "data_root": [""], "split": ["", "a/b"], "out_dir": [], "workers": ["-1", "x"],
    "device": ["tpu"], "amp": ["fp8"], "max_images": ["-1"], "mode": ["tile", ""],
    "window": ["8x8", "abc", ""], "stride": ["0x1", "1000x2000", ""], "tta": ["rot"],
    "scales": ["0", "-1,1", "a", "", "5", "1,,2"], "export_dir": [], "official": ["=3"],
    "num_pictures": ["-1"], "images": [], "use_ema": ["maybe", ""], "wandb": ["x"], "wandb_project": [""],
    "wandb_entity": [],
}
# What each entry point needs besides the field under test.
BASE = {"train": {"--data-root": "/data/cityscapes"},
        "evaluate": {"--checkpoint": "x.pt", "--data-root": "/data/cityscapes"}}


def _base(script: str, without: str = "") -> list[str]:
    return [x for k, v in BASE[script].items() if k != without for x in (k, v)]


def _cases(script: str, table: dict[str, list[str]]):
    for name, values in table.items():
        for value in values:
            yield pytest.param(script, name, value, id=f"{script}-{name}={value!r}")


def _one_line_error(script: str, argv: list[str], monkeypatch, capsys) -> str:
    """Run the entry point's main() on ``argv``; it must exit 2 with one stderr line and start nothing."""
    module = entry_point(script)
    for target in ("train", "run_evaluation"):
        if hasattr(module, target):  # reaching the job means the bad value got through
            monkeypatch.setattr(module, target, lambda cfg: pytest.fail(f"{argv} was accepted: {cfg}"))
    with pytest.raises(SystemExit) as e:
        module.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_the_sweep_covers_every_field():
    assert set(TRAIN_BAD) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(EVAL_BAD) == {f.name for f in dataclasses.fields(EvalConfig)}


@pytest.mark.parametrize("script, name, value", [*_cases("train", TRAIN_BAD), *_cases("evaluate", EVAL_BAD)])
def test_a_bad_flag_is_one_line_naming_it(script, name, value, monkeypatch, capsys):
    flag = "--" + name.replace("_", "-")
    argv = _base(script, without=flag) + ([flag + value] if value.startswith("=") else [flag, value])
    line = _one_line_error(script, argv, monkeypatch, capsys)
    assert line.startswith(f"error: {flag}: "), line
    assert len(line) > len(f"error: {flag}: ") + 10, line  # and says what is wrong and what is allowed


@pytest.mark.parametrize("script, cls", [("train", TrainConfig), ("evaluate", EvalConfig)])
def test_a_bad_recipe_value_is_one_line_naming_the_field_and_the_recipe(script, cls, tmp_path, monkeypatch,
                                                                         capsys):
    for f in dataclasses.fields(cls):
        recipe = tmp_path / f"{f.name}.yaml"
        recipe.write_text(yaml.safe_dump({f.name: LIST}))
        flag = "--" + f.name.replace("_", "-")
        line = _one_line_error(script, [*_base(script, without=flag), "--config", str(recipe)], monkeypatch, capsys)
        assert line.startswith(f"error: {flag}: got [1, 2]; must be "), line
        assert line.endswith(f"(set in {recipe})"), line
    recipe = tmp_path / "range.yaml"
    recipe.write_text("lr: -1\n" if script == "train" else "workers: -1\n")
    line = _one_line_error(script, [*_base(script), "--config", str(recipe)], monkeypatch, capsys)
    assert line.startswith("error: --lr: got -1.0; must be a finite number > 0" if script == "train"
                           else "error: --workers: got -1; must be an integer >= 0") and str(recipe) in line


@pytest.mark.parametrize("text, message", [
    ("widht: 16\n", "unknown key(s) widht"),
    ("- 1\n", "expected a mapping"),
    ("width: [\n", "not valid YAML"),
    ("lr: 0.1\nwidth: 8\nlr: 0.2\n", "lr is given twice (lines 1 and 3); keep one"),  # not the last silently
    ("crop-size: 64x64\ncrop_size: 32x32\n", "crop_size is given twice"),
])
def test_bad_recipes_are_one_line_errors(tmp_path, text, message, monkeypatch, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    line = _one_line_error("train", [*ROOT, "--config", str(recipe)], monkeypatch, capsys)
    assert message in line and str(recipe) in line


@pytest.mark.parametrize("argv, message", [
    (["--not-a-flag", "1"], "error: --not-a-flag: unknown flag"),
    (["stray"], "error: stray: unexpected argument"),
    (["--max", "5"], "error: --max: unknown flag"),  # no abbreviations: --max could be two flags
    (["--lr"], "error: --lr: expected one argument"),
    (["--config", "/nonexistent.yaml"], "error: --config: got '/nonexistent.yaml', no such file"),
    (["--device", "cuda", "--out-dir", "{tmp}"], "error: --device: got 'cuda' but no CUDA GPU is visible"),
])
@pytest.mark.quick
def test_other_mistakes_are_one_line(argv, message, tmp_path, monkeypatch, capsys):
    import torch

    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible")
    module = entry_point("train")
    if "cuda" not in argv:
        monkeypatch.setattr(module, "train", lambda cfg: pytest.fail("accepted"))
    with pytest.raises(SystemExit) as e:
        module.main([*ROOT, *(a.format(tmp=tmp_path / "run") for a in argv)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip().splitlines() == [err.strip()] and err.startswith(message), err


def test_the_flags_of_the_report_end_in_one_line_from_a_real_process(tmp_path, capsys):
    # The four that used to end in tracebacks from inside torch and numpy: one as a user runs it, in a process of
    # its own, and all four through train.py's main.
    proc = subprocess.run([sys.executable, "train.py", *ROOT, "--out-dir", str(tmp_path / "run"), "--lr", "-1"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr == "error: --lr: got -1.0; must be a finite number > 0\n", proc.stderr
    for flag in ("--lr", "--weight-decay", "--poly-power", "--seed"):
        status, err = run_main("train", [*ROOT, "--out-dir", str(tmp_path / "run"), flag, "-1"], capsys)
        assert status == 2 and err.count("\n") == 1 and err.startswith(f"error: {flag}: got -1"), err
    assert not (tmp_path / "run").exists()  # nothing was created


def test_eval_config_requires_checkpoint():
    with pytest.raises(ConfigError, match="--checkpoint: missing"):
        parse_config(["--data-root", "x"], EvalConfig)


@pytest.mark.quick
def test_recipes_take_the_spellings_help_shows(tmp_path, monkeypatch):
    """YAML 1.1 reads off/on/yes/no as booleans: `amp: off` was False and refused. Recipes mean the text."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("amp: off\nwandb: off\ncompile: yes\ndeterministic: off\ndecay-norm-bias: false\n")
    cfg = parse_config([*ROOT, "--config", str(recipe)])
    assert (cfg.amp, cfg.wandb, cfg.compile, cfg.deterministic, cfg.decay_norm_bias) == ("off", "off", True, False,
                                                                                         False)
    monkeypatch.setenv("HOME", str(tmp_path))  # --config ~/r.yaml, as every path flag expands ~
    assert parse_config([*ROOT, "--config", "~/r.yaml"]).amp == "off"


def test_options_the_model_does_not_use_are_said_to_be_ignored(capsys, tmp_path):
    parse_config([*ROOT, "--encoder-weights", "none", "--decoder-channels", "8,8,8,8,8"])
    err = capsys.readouterr().err.splitlines()
    assert err == ["note: --decoder-channels is ignored: --model unet has no pretrained encoder (it applies to the "
                   "unet_<encoder> models)",
                   "note: --encoder-weights is ignored: --model unet has no pretrained encoder (it applies to the "
                   "unet_<encoder> models)"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text("encoder-lr-mult: 0.1\n")
    parse_config([*ROOT, "--config", str(recipe)])
    assert capsys.readouterr().err.startswith("note: --encoder-lr-mult is ignored: --model unet has no")
    parse_config([*ROOT, "--model", "unet_resnet18", "--encoder-weights", "none"])  # used: nothing said
    assert capsys.readouterr().err == ""
