"""Every code block of the README runs: python blocks execute, shell lines run through the CLI (or
``make -n`` for make targets), yaml blocks validate as configuration fragments. ``text`` blocks are prose."""

import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from deepmetric.cli import app
from deepmetric.training.config import validate

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_has_blocks_and_starts_with_the_two_commands():
    assert {"python", "bash", "yaml"} <= {lang for lang, _ in BLOCKS}
    first = BLOCKS[0][1].splitlines()
    assert [line.split("#")[0].strip() for line in first] == ["make demo", "make test"]
    assert all(lang in {"python", "bash", "yaml", "text"} for lang, _ in BLOCKS)


def test_python_blocks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for lang, code in BLOCKS:
        if lang == "python":
            exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102


def test_shell_blocks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    for lang, code in BLOCKS:
        if lang != "bash":
            continue
        for line in code.splitlines():
            command = line.split("  #")[0].strip()
            if not command:
                continue
            words = shlex.split(command)
            if words[0] == "make":
                subprocess.run(["make", "-n", "-C", str(ROOT), *words[1:]], check=True, capture_output=True)
            else:
                assert words[0] == "deepmetric", command
                result = runner.invoke(app, words[1:])
                assert result.exit_code == 0, f"{command}\n{result.output}"


@pytest.mark.parametrize("code", [c for lang, c in BLOCKS if lang == "yaml"])
def test_yaml_blocks_are_valid_config(code):
    validate(yaml.safe_load(code))
