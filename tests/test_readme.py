"""Every code block of the README runs: python blocks execute, shell lines run through the CLI (or
``make -n`` for make targets; ``deepmetric serve`` for real, see :func:`check_serve`), yaml blocks validate as
configuration fragments. ``text`` blocks are prose."""

import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
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


def test_readme_serves_and_shows_the_page():
    lines = [line.strip() for lang, code in BLOCKS if lang == "bash" for line in code.splitlines()]
    assert any(line.startswith("deepmetric serve ") for line in lines)  # started for real by test_shell_blocks
    shots = re.findall(r"!\[[^\]]*\]\((docs/[^)]+\.png)\)", (ROOT / "README.md").read_text())
    assert "docs/serve.png" in shots and all((ROOT / shot).is_file() for shot in shots)


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
            elif words[:2] == ["deepmetric", "serve"]:
                check_serve(words[2:])
            else:
                assert words[0] == "deepmetric", command
                result = runner.invoke(app, words[1:])
                assert result.exit_code == 0, f"{command}\n{result.output}"


def check_serve(args: list[str], budget: float = 120.0) -> None:
    """Run a README ``deepmetric serve`` line as a server process on a free 127.0.0.1 port (``--port``
    overridden), wait for ``/health``, load the page, search by a listed item's id, then stop it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "deepmetric.cli", "serve", *args, "--host", "127.0.0.1",
                               "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + budget
        while True:
            assert server.poll() is None, f"deepmetric serve exited with {server.returncode}"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"deepmetric serve did not answer /health within {budget} s"
            time.sleep(0.2)
        assert "/static/app.js" in httpx.get(url).text
        item = httpx.get(f"{url}/items?limit=1").json()[0]["id"]
        response = httpx.post(f"{url}/search", json={"id": item, "k": 3})
        assert response.status_code == 200 and len(response.json()["hits"]) == 3, response.text
    except AssertionError as exc:
        server.terminate()
        raise AssertionError(f"{exc}\n{server.communicate(timeout=10)[0]}") from None
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.mark.parametrize("code", [c for lang, c in BLOCKS if lang == "yaml"])
def test_yaml_blocks_are_valid_config(code):
    validate(yaml.safe_load(code))
