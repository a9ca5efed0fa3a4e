"""Fidelity tier names and the settings layers (defaults < TOML < environment < flags)."""

import dataclasses
import json
from pathlib import Path

import pytest
from archive_data import S1, archived, phantom

from latentpacs.codec.tiers import Tier, TierKind
from latentpacs.config import load_config
from latentpacs.errors import ConfigError, TierError


@pytest.mark.parametrize(
    ("text", "name", "near", "lossy"),
    [
        ("latent", "latent", 0, True),
        ("lossless", "lossless", 0, False),
        ("near-lossless:3", "near-lossless", 3, True),
        ("Near-Lossless:255", "near-lossless", 255, True),
    ],
)
def test_tier_parse(text: str, name: str, near: int, lossy: bool) -> None:
    tier = Tier.parse(text)
    assert (tier.name, tier.near, tier.lossy) == (name, near, lossy)
    assert Tier.parse(str(tier)) == tier


@pytest.mark.parametrize("text", ["lossy", "near-lossless", "near-lossless:0", "near-lossless:x", "near-lossless:256"])
def test_tier_parse_rejects(text: str) -> None:
    with pytest.raises(TierError, match="tier|K"):
        Tier.parse(text)


def test_tier_kinds_read_as_the_plain_strings_archived_before() -> None:
    tier = Tier.parse("near-lossless:4")
    assert tier.name is TierKind.NEAR_LOSSLESS and tier.name == "near-lossless"
    assert Tier("near-lossless", 4) == tier and hash(Tier("near-lossless", 4)) == hash(tier)
    assert [str(Tier.parse(text)) for text in ("LATENT", " lossless ", "near-lossless:4")] == [
        "latent", "lossless", "near-lossless:4"]
    assert json.dumps({"tier": tier.name, "text": str(tier)}) == '{"tier": "near-lossless", "text": "near-lossless:4"}'
    with pytest.raises(TierError, match="unknown tier kind"):
        Tier("jpeg")


@pytest.mark.parametrize("text", ["near-lossless:999", "near-lossless:0", "near-lossless:07", "LATENT", "jpeg"])
def test_the_archive_refuses_what_the_tier_grammar_refuses(text: str) -> None:
    image = archived(phantom("P1", "Doe^Jane", "19600101", S1, "20240115", "090000", "Screening", 1), "latent")
    assert dataclasses.replace(image, tier="near-lossless:255").tier == "near-lossless:255"
    with pytest.raises(TierError):
        dataclasses.replace(image, tier=text)
    if text not in ("LATENT", "near-lossless:07"):  # Tier.parse reads these; the archive keeps only canonical text
        with pytest.raises(TierError):
            Tier.parse(text)


def test_layers_override_in_order(tmp_path: Path) -> None:
    toml = tmp_path / "node.toml"
    toml.write_text(
        '[node]\naet = "FROMFILE"\nport = 4000\n[codec]\ntier = "lossless"\n'
        '[destinations.VIEWER]\nhost = "127.0.0.1"\nport = 4242\n'
        '[security]\nallowed_calling_aets = ["A", "B"]\n'
    )
    config = load_config(toml, environ={"LATENTPACS_NODE_PORT": "5000"}, overrides={"node.aet": "FLAG", "codec.model": None})
    assert config["node.aet"] == "FLAG"  # flag beats file
    assert config["node.port"] == 5000  # environment beats file
    assert config.tier == Tier("lossless")  # file beats default
    assert config["codec.model"] == "ae"  # a None flag is ignored
    assert config["security.allowed_calling_aets"] == ["A", "B"]
    assert config.destinations["VIEWER"].port == 4242
    assert config.database_url.startswith("sqlite:///") and config.database_url.endswith("archive.db")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("[node]\nport = 'many'\n", "node.port"),
        ("[node]\ncolour = 'red'\n", "unknown setting node.colour"),
        ("[codec]\ntier = 'jpeg'\n", "unknown tier"),
        ("[destinations.X]\nhost = 'h'\n", "needs host and port"),
        ("not toml at all [", "not valid TOML"),
    ],
)
def test_bad_config_is_named(tmp_path: Path, body: str, message: str) -> None:
    toml = tmp_path / "bad.toml"
    toml.write_text(body)
    with pytest.raises(ConfigError, match=message):
        load_config(toml, environ={})


def test_bad_environment_value_is_named() -> None:
    with pytest.raises(ConfigError, match="LATENTPACS_NODE_PORT"):
        load_config(None, environ={"LATENTPACS_NODE_PORT": "eleven"})


@pytest.mark.parametrize(
    ("tier", "allowed", "refused"),
    [
        ("latent", ["lossless"], True),
        ("near-lossless:2", ["lossless"], True),
        ("lossless", ["lossless"], False),
        ("near-lossless:2", ["lossless", "near-lossless:1"], True),
        ("near-lossless:1", ["lossless", "near-lossless:1"], False),
        ("near-lossless:4", ["lossless", "near-lossless"], False),  # a kind admits every K
    ],
)
def test_an_archive_of_record_refuses_tiers_it_may_not_keep(tier: str, allowed: list[str], refused: bool) -> None:
    overrides = {"codec.tier": tier, "archive.of_record": "true", "archive.of_record_tiers": ",".join(allowed)}
    if refused:
        with pytest.raises(ConfigError, match=f"codec.tier {tier} is not kept as of record"):
            load_config(None, environ={}, overrides=overrides)
    else:
        assert str(load_config(None, environ={}, overrides=overrides).tier) == tier
    # the same tier is accepted where the archive is not the archive of record
    assert str(load_config(None, environ={}, overrides={**overrides, "archive.of_record": "false"}).tier) == tier


def test_of_record_is_off_by_default_and_its_tiers_must_be_tiers() -> None:
    config = load_config(None, environ={})
    assert config["archive.of_record"] is False and config["archive.of_record_tiers"] == ["lossless"]
    assert config.tier == Tier("latent")
    with pytest.raises(ConfigError, match="archive.of_record_tiers: unknown tier 'jpeg'"):
        load_config(None, environ={"LATENTPACS_ARCHIVE_OF_RECORD_TIERS": "lossless,jpeg"})


def test_import_into_an_archive_of_record_at_a_lossy_tier_stores_nothing(tmp_path: Path, capsys) -> None:
    from latentpacs import phantom as generator
    from latentpacs.cli import main

    sources = generator.generate(tmp_path / "dicom", 1, seed=33, size=(128, 104), images_per_study=1)
    flags = ["--database", f"sqlite:///{tmp_path / 'a.db'}", "--data-dir", str(tmp_path / "data")]
    environ = {"LATENTPACS_ARCHIVE_OF_RECORD": "true"}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in environ.items():
            patch.setenv(key, value)
        assert main(["archive", "import", str(sources[0]), "--tier", "latent", *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "not kept as of record" in err[0]
        assert not (tmp_path / "a.db").exists()
        assert main(["archive", "import", str(sources[0]), "--tier", "lossless", *flags]) == 0
