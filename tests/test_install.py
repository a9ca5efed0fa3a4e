"""A plain (non-editable) install carries the shipped models and finds them, hash-checked.

The wheel is built from a copy of the checkout with pip and setuptools from the
project's virtual environment (no build isolation, so nothing is downloaded), installed
with ``pip install --target``, and exercised in a fresh interpreter whose first path
entry is that target, so the installed copy is imported, not ``src/``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from latentpacs.codec.modelfile import ModelCard, default_models_dir, save_model, sha256_file
from latentpacs.codec.models import build_model

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ("ae", "vae", "coder")

# Run in the installed copy: where it was imported from, `models list --json`, and each
# model loaded by name with its card's SHA-256 required.
PROBE = """
import contextlib, io, json, sys
import latentpacs
from latentpacs.cli import main
from latentpacs.codec import learned
from latentpacs.codec.modelfile import default_models_dir, find_model_by_sha256, load_model
def load(card):
    if card["arch"] == learned.ARCH:  # the stream coder's model: integers, no torch module
        return learned.load_coder_model(card["name"], expected_sha256=card["sha256"]).sha256
    return load_model(card["name"], expected_sha256=card["sha256"]).card.sha256
out = io.StringIO()
with contextlib.redirect_stdout(out):
    code = main(["models", "list", "--json"])
listed = json.loads(out.getvalue())
loaded = {card["name"]: load(card) for card in listed}
retired = {sha: str(find_model_by_sha256(sha)) for sha in sys.argv[1:]}
print(json.dumps({"file": latentpacs.__file__, "models_dir": str(default_models_dir()), "code": code,
                  "listed": listed, "loaded": loaded, "retired": retired}))
"""


def _pip(*args: str, cwd: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def _checkout_copy(target: Path) -> Path:
    """The files a build reads, copied so the build leaves nothing in the shared checkout."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.checkpoints")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, target / name)
    if (REPO / "MANIFEST.in").is_file():
        shutil.copy(REPO / "MANIFEST.in", target / "MANIFEST.in")
    shutil.copytree(REPO / "src", target / "src", symlinks=True, ignore=ignore)
    shutil.copytree(REPO / "models", target / "models", ignore=ignore)
    return target


def _retire_one(models: Path) -> ModelCard:
    """Save a tiny model twice under one name, so the first version moves to models/retired/."""
    cards = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        cards.append(save_model(build_model("ae", image_size=64), models, "old", description="retired in a test",
                                training={"command": "test"}, metrics={}))
    assert cards[0].sha256 != cards[1].sha256
    assert any((models / "retired").glob("old-*.safetensors"))
    return cards[0]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, ModelCard]:
    """(wheel, sdist) built from a checkout copy that also holds one retired model."""
    tree = _checkout_copy(tmp_path_factory.mktemp("tree"))
    retired = _retire_one(tree / "models")
    dist = tmp_path_factory.mktemp("dist")
    _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(dist), ".", cwd=tree)
    sdist = subprocess.run(
        [sys.executable, "-c", f"from setuptools import build_meta; print(build_meta.build_sdist({str(dist)!r}))"],
        cwd=tree, capture_output=True, text=True, timeout=300,
    )
    assert sdist.returncode == 0, sdist.stderr[-4000:]
    (wheel,) = dist.glob("latentpacs-*.whl")
    return wheel, dist / sdist.stdout.strip().splitlines()[-1], retired


def test_a_wheel_install_lists_and_loads_the_shipped_models(
    built: tuple[Path, Path, ModelCard], tmp_path: Path
) -> None:
    wheel, _sdist, retired = built
    target = tmp_path / "site"
    _pip("install", "--no-deps", "--no-index", "--target", str(target), "-q", str(wheel), cwd=tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LATENTPACS_")}
    env["PYTHONPATH"] = str(target)
    proc = subprocess.run([sys.executable, "-c", PROBE, retired.sha256], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(seen["file"]).is_relative_to(target), seen["file"]  # the installed copy, not src/
    assert Path(seen["models_dir"]) == target / "latentpacs" / "models"
    assert seen["code"] == 0
    listed = {card["name"]: card for card in seen["listed"]}
    assert set(SHIPPED) <= set(listed)
    for name in SHIPPED:
        expected = sha256_file(REPO / "models" / f"{name}.safetensors")
        assert listed[name]["sha256"] == expected
        assert seen["loaded"][name] == expected
        installed = target / "latentpacs" / "models" / f"{name}.safetensors"
        assert installed.read_bytes() == (REPO / "models" / f"{name}.safetensors").read_bytes()
    assert Path(seen["retired"][retired.sha256]).parent == target / "latentpacs" / "models" / "retired"
    for name in ("index.html", "viewer.js", "viewer.css"):  # the viewer works from a plain install
        installed = target / "latentpacs" / "web" / "static" / name
        assert installed.read_bytes() == (REPO / "src" / "latentpacs" / "web" / "static" / name).read_bytes()


def test_the_sdist_carries_the_models(built: tuple[Path, Path, ModelCard]) -> None:
    _wheel, sdist, retired = built
    with tarfile.open(sdist) as archive:
        members = {m.name.partition("/")[2]: m for m in archive.getmembers()}
    for name in SHIPPED:
        for suffix in (".safetensors", ".json"):
            member = members[f"src/latentpacs/models/{name}{suffix}"]
            assert member.isfile() and member.size == (REPO / "models" / f"{name}{suffix}").stat().st_size
    assert f"src/latentpacs/models/retired/old-{retired.sha256[:16]}.safetensors" in members


def test_the_checkout_finds_the_top_level_models_and_their_retired_folder() -> None:
    if "LATENTPACS_MODELS" in os.environ:
        pytest.fail("LATENTPACS_MODELS is set; this test checks the default")
    assert default_models_dir().resolve() == (REPO / "models").resolve()
    assert (default_models_dir() / "retired").resolve() == (REPO / "models" / "retired").resolve()
