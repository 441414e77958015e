"""The config loader: defaults < files < flags, types, and the errors for mistakes."""

import dataclasses
from dataclasses import dataclass

import pytest

from sologpt.configurator import UserError, load_config


@dataclass
class Cfg:
    name: str = "x"
    lr: float = 1e-3
    steps: int = 10
    flag: bool = False
    top_k: int | None = 5
    compile: bool | str = "auto"


def write(tmp_path, text, name="c.py"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_precedence_defaults_files_flags(tmp_path):
    a = write(tmp_path, "steps = 20\nlr = 1\nname = 'a'\n", "a.py")
    b = write(tmp_path, "import math\n_helper = 3\nsteps = 30 * _helper\n", "b.py")
    cfg = load_config(Cfg, [a, b, "--name=run-1", "--flag=True"])
    assert (cfg.steps, cfg.lr, cfg.name, cfg.flag) == (90, 1.0, "run-1", True)  # int 1 widened to float
    assert type(cfg.lr) is float
    assert load_config(Cfg, []) == Cfg()


def test_flag_values_are_parsed_by_type():
    cfg = load_config(Cfg, ["--lr=3e-4", "--top_k=None", "--compile=False", "--name=123"])
    assert cfg.lr == 3e-4 and cfg.top_k is None and cfg.compile is False
    assert cfg.name == "123"  # a str field keeps the text
    assert load_config(Cfg, ["--compile=max-autotune"]).compile == "max-autotune"


@pytest.mark.parametrize("argv, message", [
    (["--stpes=3"], "unknown config key 'stpes' in flag '--stpes=3': did you mean 'steps'?"),
    (["--zzz=3"], "unknown config key 'zzz'"),
    (["--steps"], "has no value"),
    (["--steps=2.5"], "steps=2.5 in flag '--steps=2.5' has type float, expected int"),
    (["--steps=True"], "expected int"),  # a bool is not an int
    (["--flag=1"], "expected bool"),
    (["--top_k=high"], "expected int or None"),
])
def test_flag_errors(argv, message):
    with pytest.raises(UserError, match=message.replace("?", r"\?").replace("(", r"\(")):
        load_config(Cfg, argv)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e999", "NaN", "Infinity", "9" * 400])
def test_a_float_must_be_finite_on_the_command_line(value):
    with pytest.raises(UserError, match=r"lr=.* in flag '--lr=.*' must be a finite number"):
        load_config(Cfg, [f"--lr={value}"])
    assert load_config(Cfg, ["--name=nan"]).name == "nan"  # a str field keeps the text


def test_a_float_must_be_finite_in_a_file_and_in_code(tmp_path):
    with pytest.raises(UserError, match="lr=nan in config file .* must be a finite number"):
        load_config(Cfg, [write(tmp_path, "lr = float('nan')\n")])
    import train
    from sologpt import checks
    for key in ("distill_temperature", "lora_alpha", "min_lr"):  # a config built in code skips the parser
        with pytest.raises(UserError, match=f"{key}=nan must be a finite number"):
            checks.resolve(train.TrainConfig(device="cpu", **{key: float("nan")}))


def test_a_search_space_file_points_to_the_search_tool(tmp_path):
    for text, shown in (("lr = [1e-3, 2e-3]\n", "lr = [0.001, 0.002]"), ("search_dir = 'x'\n", "search_dir = 'x'")):
        path = write(tmp_path, text)
        with pytest.raises(UserError) as e:
            load_config(Cfg, [path])
        assert str(e.value) == f"config file {path} is a search space ({shown}): run it with python -m tools.search {path}"


def test_file_errors(tmp_path):
    with pytest.raises(UserError, match="did you mean 'steps'"):
        load_config(Cfg, [write(tmp_path, "step = 3\n")])
    with pytest.raises(UserError, match="lr='fast' in config file .* expected float"):
        load_config(Cfg, [write(tmp_path, "lr = 'fast'\n")])
    with pytest.raises(UserError, match="does not exist"):
        load_config(Cfg, [str(tmp_path / "missing.py")])


def test_shipped_config_files_load():
    import train
    from conftest import REPO
    from tools import search
    for path in sorted((REPO / "config").glob("*.py")):
        if path.name.startswith("search_"):  # a search space (python -m tools.search), given after a recipe
            search.load([str(REPO / "config" / "small.py"), str(path)])
        else:
            load_config(train.TrainConfig, [str(path)])


def test_help_lists_every_field_with_default_and_comment(capsys):
    import train as train_mod
    with pytest.raises(SystemExit) as e:
        train_mod.main(["config/small.py", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for field in dataclasses.fields(train_mod.TrainConfig):
        assert f"\n  {field.name}: " in out, field.name
    assert 'learning_rate: float = 6e-4  # peak learning rate' in out
