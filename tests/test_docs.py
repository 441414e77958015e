"""Every command in README.md and docs/*.md runs as written, as far as the CPU can tell: the config files it names
exist, every --key=value is a field of the script's config with a value of the right type, and every flag of an
argparse script (tools/quantize.py, bench/, prepare/) is one its --help lists. CI runs the quick start itself."""

import re
import shlex
import subprocess
import sys
from functools import lru_cache

import pytest

import sample
import train
from conftest import REPO
from sologpt.configurator import load_config
from tools import evaluate, export, score

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
CONFIGS = {"train.py": train.TrainConfig, "sample.py": sample.SampleConfig, "-m tools.score": score.ScoreConfig,
           "-m tools.export": export.ExportConfig, "-m tools.evaluate": evaluate.EvaluateConfig}


def commands(path):
    """The python commands of a page: lines of ```bash blocks (continuations joined) and `python ...` spans."""
    text = path.read_text(encoding="utf-8")
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith(("python ", "torchrun ")):
                out.append(line)
    out += [span for span in re.findall(r"`((?:python|torchrun) [^`]+)`", text)]
    return out


def script_and_args(cmd):
    cmd = re.sub(r"\[[^\]]*\]", "", cmd)  # [--optional flags] stand for choices, not literal text
    words = [w for w in shlex.split(cmd)[1:] if w not in ("...", "-u")]
    if cmd.startswith("torchrun "):  # its own flags (--nproc_per_node=2, ...) come before the script
        words = words[next(i for i, w in enumerate(words) if not w.startswith("--")):]
    if words[0] == "-m":
        return f"-m {words[1]}", words[2:]
    return words[0], words[1:]


@lru_cache(maxsize=None)
def help_text(script):
    argv = script.split()
    res = subprocess.run([sys.executable, *argv, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, (script, res.stderr[-500:])
    return res.stdout


ALL = [(path.name, cmd) for path in DOCS for cmd in commands(path)]


def test_the_pages_have_commands():
    assert len(ALL) > 40 and {name for name, _ in ALL} >= {"README.md", "training.md", "performance.md"}


@pytest.mark.parametrize("page, cmd", ALL, ids=[f"{p}:{c[:60]}" for p, c in ALL])
def test_command_is_valid(page, cmd):
    script, args = script_and_args(cmd)
    if args == ["--help"]:
        help_text(script)
        return
    if script in CONFIGS:
        files = [a for a in args if not a.startswith("--")]
        for f in files:
            assert (REPO / f).is_file(), f"{page}: {cmd}: no config file {f}"
        load_config(CONFIGS[script], files and [str(REPO / f) for f in files] + [a for a in args if a.startswith("--")]
                    or args)
        return
    assert script.startswith(("-m tools.", "-m bench.", "prepare/")), f"{page}: {cmd}: unknown script {script}"
    if script.startswith("prepare/"):
        assert (REPO / script).is_file(), f"{page}: {cmd}"
    listed = help_text(script)
    for flag in (a.split("=")[0] for a in args if a.startswith("--")):
        assert flag in listed, f"{page}: {cmd}: {script} has no flag {flag}"
