"""The ``latentpacs`` command line as a new user types it, through the real console script.

Global options (``--config``, ``-v``) work before and after the sub-command, repeated list
options add up, file operands may follow options, a flag's help shows its setting's
default from :data:`latentpacs.config.SETTINGS`, and a usage error is one line, exit 2.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from latentpacs import phantom
from latentpacs.codec.modelfile import save_model
from latentpacs.codec.models import build_model
from latentpacs.config import SETTINGS
from netpeers import START_TIMEOUT_S, STOP_TIMEOUT_S, _port_written, _spawn, _stop, wait_for_echo

SCRIPT = Path(sys.executable).parent / "latentpacs"
ROWS = {setting.name: setting for setting in SETTINGS}
#: Failure bound for one command (never a timing assertion).
RUN_TIMEOUT_S = 300.0


def latentpacs(*argv: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed console script; wide COLUMNS so that help lines do not wrap."""
    if not SCRIPT.is_file():
        pytest.fail(f"{SCRIPT} is missing: pip install -e . in the virtualenv")
    env = {**os.environ, "COLUMNS": "250"}
    env = {key: value for key, value in env.items() if not key.startswith("LATENTPACS_")}
    return subprocess.run([str(SCRIPT), *map(str, argv)], capture_output=True, text=True, env=env,
                          cwd=cwd, stdin=subprocess.DEVNULL, timeout=RUN_TIMEOUT_S)


def shown(result: subprocess.CompletedProcess[str], name: str) -> str:
    """The value ``config show`` printed for setting ``name``."""
    for line in result.stdout.splitlines():
        fields = line.split()
        if fields and fields[0] == name:
            return fields[1]
    pytest.fail(f"config show printed no {name}:\n{result.stdout}{result.stderr}")


def node_toml(directory: Path, aet: str, extra: str = "") -> Path:
    config = directory / f"{aet.lower()}.toml"
    config.write_text(
        f'[node]\naet = "{aet}"\nhost = "127.0.0.1"\n'
        f'[archive]\ndatabase = "sqlite:///{directory / "archive.db"}"\ndata_dir = "{directory / "data"}"\n'
        + extra
    )
    return config


def test_config_is_read_before_and_after_the_command_and_the_last_one_wins(tmp_path: Path) -> None:
    before, after = node_toml(tmp_path, "BEFOREAET"), node_toml(tmp_path, "AFTERAET")
    assert shown(latentpacs("config", "show"), "node.aet") == repr(ROWS["node.aet"].default)
    assert shown(latentpacs("config", "show", "--config", after), "node.aet") == "'AFTERAET'"
    assert shown(latentpacs("--config", before, "config", "show"), "node.aet") == "'BEFOREAET'"
    assert shown(latentpacs("config", "--config", after, "show"), "node.aet") == "'AFTERAET'"
    both = latentpacs("--config", before, "config", "show", "--config", after)
    assert both.returncode == 0 and shown(both, "node.aet") == "'AFTERAET'"


def test_verbose_after_the_command_raises_the_log_level(tmp_path: Path) -> None:
    quiet = latentpacs("db", "upgrade", "--database", f"sqlite:///{tmp_path / 'quiet.db'}")
    loud = latentpacs("db", "upgrade", "--database", f"sqlite:///{tmp_path / 'loud.db'}", "-v")
    assert quiet.returncode == 0 and loud.returncode == 0
    assert "Running upgrade" not in quiet.stderr
    assert "Running upgrade" in loud.stderr  # alembic at INFO with one -v


def test_serve_with_config_after_the_command_starts_and_stops_on_sigterm(tmp_path: Path) -> None:
    # The node answers only to the AE title in the file; at the lossless tier it starts
    # without building a model engine (what is tested here is the command line).
    config = node_toml(tmp_path, "CLISERVE", '[codec]\ntier = "lossless"\n')
    port_file, log = tmp_path / "node.port", tmp_path / "node.log"
    proc = _spawn([SCRIPT, "serve", "--config", config, "--port", "0", "--port-file", port_file], log,
                  env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=tmp_path)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _port_written(port_file):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"latentpacs serve wrote no port (exit {proc.poll()}):\n{log.read_text()[-4000:]}")
            time.sleep(0.1)
        port = int(port_file.read_text())
        assert port > 0
        wait_for_echo(port, "CLISERVE", proc=proc, log=log)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=STOP_TIMEOUT_S * 6) == 0, log.read_text()[-4000:]
    finally:
        _stop(proc)
    assert "CLISERVE listening on 127.0.0.1" in log.read_text()


def test_repeated_model_flags_evaluate_every_model(tmp_path: Path) -> None:
    models = tmp_path / "models"  # small untrained models keep this fast; quality is not the point
    for arch in ("ae", "vae"):
        save_model(build_model(arch, image_size=64), models, f"tiny-{arch}", description="untrained test model",
                   training={}, metrics={})
    data = tmp_path / "data"
    phantom.generate(data, 2, 5, size=(256, 208), images_per_study=2)
    out = tmp_path / "out"
    result = latentpacs("evaluate", "--data", data, "--model", "tiny-ae", "--model", "tiny-vae", "--tiers",
                        "--previews", "1", "--models-dir", models, "--out", out)
    assert result.returncode == 0, result.stderr
    with (out / "metrics.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {"tiny-ae", "tiny-vae"} <= {row["codec"] for row in rows}
    assert [row["codec"] for row in rows].count("tiny-vae") == 2  # both images, the second model too
    assert {"tiny-ae", "tiny-vae"} <= set(json.loads((out / "summary.json").read_text())["codecs"])
    assert "1 measurement report(s)" in result.stdout  # both images are one study
    assert len(list((out / "dicom" / "sr").glob("*.dcm"))) == 1
    one = sorted(data.rglob("*.dcm"))[:1]  # one image is enough to show that nothing DICOM is written
    again = latentpacs("evaluate", "--data", *one, "--model", "tiny-ae", "--tiers", "--previews", "1",
                       "--models-dir", models, "--no-dicom", "--out", tmp_path / "plain")
    assert again.returncode == 0, again.stderr
    assert not (tmp_path / "plain" / "dicom").exists()


def test_help_shows_the_settings_help_and_default(tmp_path: Path) -> None:
    encode = " ".join(latentpacs("encode", "--help").stdout.split())
    for name in ("codec.tier", "codec.model"):
        row = ROWS[name]
        assert f"{row.help} (setting {name}, default: {row.default})" in encode
    serve = " ".join(latentpacs("serve", "--help").stdout.split())
    assert f"{ROWS['node.port'].help} (setting node.port, default: {ROWS['node.port'].default})" in serve
    assert "--config FILE" in serve  # the global options are listed under each command too


def test_file_operands_may_follow_options(tmp_path: Path) -> None:
    result = latentpacs("inspect", tmp_path / "first.lpz", "--json", tmp_path / "second.lpz")
    assert result.returncode == 1  # both named as unreadable, not "unrecognized arguments"
    lines = result.stderr.splitlines()
    assert len(lines) == 2 and "first.lpz" in lines[0] and "second.lpz" in lines[1]


@pytest.mark.parametrize("argv", [
    ("serve", "--bogus"),
    ("serve", "--port", "eleven"),
    ("evaluate", "--out", "x"),
    ("archive", "stats", "surplus"),
    ("nosuchcommand",),
])
def test_a_usage_error_is_one_line_and_exit_2(argv: tuple[str, ...], tmp_path: Path) -> None:
    result = latentpacs(*argv, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "error:" in result.stderr and "--help" in result.stderr
