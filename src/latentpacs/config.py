"""Settings: defaults < TOML file < ``LATENTPACS_*`` environment < command-line flags.

Every setting is one row of :data:`SETTINGS` (dotted name, default, type, help); the CLI
shows the table with ``latentpacs config show``. A TOML section ``[a]`` with key ``b`` is
setting ``a.b``; its environment variable is ``LATENTPACS_A_B`` (dots and dashes become
underscores). C-MOVE destinations are TOML tables ``[destinations.AETITLE]`` with ``host``
and ``port``. Nothing here reads a file or the environment at import time.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latentpacs.codec.tiers import Tier, TierKind
from latentpacs.errors import ConfigError, TierError


@dataclass(frozen=True)
class Setting:
    """One setting: its dotted name, default, Python type and help text."""

    name: str
    default: Any
    type: type
    help: str

    @property
    def env_var(self) -> str:
        """The environment variable that overrides the TOML file."""
        return "LATENTPACS_" + self.name.replace(".", "_").replace("-", "_").upper()


SETTINGS: tuple[Setting, ...] = (
    Setting("node.aet", "LATENTPACS", str, "AE title of the node (PS3.8 7.1.1.3)"),
    Setting("node.host", "0.0.0.0", str, "address the node listens on"),
    Setting("node.port", 11112, int, "TCP port the node listens on (0: any free port)"),
    Setting("node.max_associations", 16, int, "concurrent associations accepted"),
    Setting("node.max_pdu_size", 262144, int, "largest P-DATA PDU received, bytes (PS3.8 9.3.1)"),
    Setting("node.network_timeout", 60.0, float, "seconds without network traffic before abort"),
    Setting("node.acse_timeout", 30.0, float, "seconds to wait for association messages"),
    Setting("node.dimse_timeout", 60.0, float, "seconds to wait for DIMSE messages"),
    Setting("node.extra_storage_classes", [], list, "grayscale single-frame SOP Class UIDs accepted besides mammography"),
    Setting("archive.database", "", str, "SQLAlchemy URL; empty: sqlite:///<data_dir>/archive.db"),
    Setting("archive.data_dir", "./latentpacs-data", str, "directory for the SQLite file and blobs"),
    Setting("archive.duplicates", "keep", str, "re-sent instance policy: keep | replace | reject"),
    Setting("archive.blobs", "", str, "where streams above 64 KiB go: s3://bucket/prefix (an "
            "S3-compatible bucket) or a directory; empty: <data_dir>/blobs"),
    Setting("archive.s3_endpoint", "", str, "URL of the S3-compatible server (path-style); "
            "empty: AWS's endpoint for the region"),
    Setting("archive.s3_region", "", str, "S3 region; empty: boto3's default (AWS_DEFAULT_REGION)"),
    Setting("archive.s3_access_key_id", "", str, "S3 access key; empty: boto3's standard chain "
            "(AWS_ACCESS_KEY_ID, ~/.aws/credentials, instance role)"),
    Setting("archive.s3_secret_access_key", "", str, "S3 secret key; empty: boto3's standard "
            "chain (AWS_SECRET_ACCESS_KEY...)"),
    Setting("archive.of_record", False, bool, "this archive is the archive of record (US MQSA, 21 CFR "
            "900.12(c)(4)): codec.tier must be one of archive.of_record_tiers"),
    Setting("archive.of_record_tiers", ["lossless"], list, "tiers that count as of record: a tier "
            "(lossless, near-lossless:K) or a kind (near-lossless: any K)"),
    Setting("codec.model", "ae", str, "model name (in models_dir) used for new images"),
    Setting("codec.tier", "latent", str, "fidelity tier: latent | lossless | near-lossless:K"),
    Setting("codec.coder", "jpeg-ls", str, "stream coder of the lossless and near-lossless tiers"),
    Setting("codec.deferred", True, bool, "lossless tier: acknowledge native images once durable "
            "as received, code them afterwards"),
    Setting("codec.deferred_background", True, bool, "code deferred images in a background thread; "
            "false: they stay as received until `latentpacs archive code-pending` (a nightly job)"),
    Setting("codec.recompress", True, bool, "the background coder, when idle, recompresses "
            "lossless rows of other coders with codec.coder (as `latentpacs archive recompress`)"),
    Setting("codec.device", "", str, "torch device; empty: cuda when available, else cpu"),
    Setting("codec.models_dir", "", str, "directory of model files; empty: the shipped models/"),
    Setting("codec.max_batch", 8, int, "largest batch the inference engine runs at once"),
    Setting("node.shutdown_grace", 30.0, float, "seconds SIGTERM waits for in-flight associations"),
    Setting("node.proxy_protocol", False, bool, "every connection starts with a PROXY protocol v2 "
            "header (HAProxy send-proxy-v2): permissions apply to the peer it names; "
            "connections without one are closed"),
    Setting("security.allowed_calling_aets", [], list, "calling AE titles that may use every service"),
    Setting("security.unknown_peers", ["echo", "store"], list, "services other peers may use: echo, store, find, get, move"),
    Setting("security.trust_loopback", True, bool, "treat peers on the loopback interface as listed"),
    Setting("security.tls_cert", "", str, "PEM server certificate; set with tls_key: DICOM TLS (PS3.15 B.1)"),
    Setting("security.tls_key", "", str, "PEM private key of tls_cert (unencrypted)"),
    Setting("security.tls_ca", "", str, "PEM CA certificates that client certificates must chain to"),
    Setting("security.tls_require_client_cert", False, bool, "refuse TLS clients without a certificate from tls_ca"),
    Setting("limits.max_find_answers", 10000, int, "C-FIND answers per request; more: refused with A700"),
    Setting("limits.max_retrieve_instances", 10000, int, "C-GET/C-MOVE sub-operations per request; more: refused with A700"),
    Setting("limits.max_image_pixels", 67108864, int, "largest Rows x Columns decoded for a retrieval"),
    Setting("limits.max_concurrent_decodes", 4, int, "images decoded at once across all associations"),
    Setting("web.enabled", True, bool, "serve DICOMweb (PS3.18), the viewer and /metrics from `serve`"),
    Setting("web.host", "127.0.0.1", str, "address the web server listens on"),
    Setting("web.port", 8042, int, "TCP port of the web server (0: any free port)"),
    Setting("web.trust_loopback", False, bool, "serve loopback clients without a token, "
            "with every permission (as security.trust_loopback does for DIMSE)"),
    Setting("web.tls", False, bool, "HTTPS with security.tls_cert/tls_key; security.tls_ca and "
            "tls_require_client_cert ask for client certificates"),
    Setting("web.max_stow_bytes", 2147483648, int, "largest STOW-RS request body, bytes; more: 413"),
    Setting("web.public_url", "", str, "base URL clients reach the web server at, e.g. "
            "https://pacs.example.org (Retrieve URLs); empty: the address the request came in on"),
    Setting("audit.syslog", "", str, "audit messages (PS3.15 A.5) as RFC 5424 syslog to "
            "udp://host:port or tcp://host:port; empty: off"),
    Setting("audit.file", "", str, "audit messages as JSON lines appended to this file; empty: off"),
    Setting("audit.source_id", "", str, "AuditSourceID of the audit messages; empty: node.aet"),
)
#: Permissions a web token can carry (``[web.tokens.NAME] services``), by the DIMSE service
#: each matches: ``store`` is STOW-RS (C-STORE), ``query`` QIDO-RS (C-FIND), ``retrieve``
#: WADO-RS (C-GET); ``metrics`` reads ``/metrics``.
WEB_PERMISSIONS = ("store", "query", "retrieve", "metrics")
#: Services a peer can be allowed (``security.unknown_peers``).
SERVICES = ("echo", "store", "find", "get", "move")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_BY_NAME = {s.name: s for s in SETTINGS}


def _check_of_record(tier: Tier, of_record: bool, allowed: list[str]) -> None:
    """Refuse a storage tier that an archive of record may not keep.

    US rules (MQSA, 21 CFR 900.12(c)(4)) allow only lossless mammograms as the archive of
    record; a lossy tier there would silently discard what the record must keep.

    Raises
    ------
    ConfigError
        When an entry of ``archive.of_record_tiers`` names no tier, or the archive is of
        record and ``tier`` is not among them.
    """
    kinds = {kind.value for kind in TierKind}
    for entry in allowed:
        if entry.strip().lower() not in kinds:
            try:
                Tier.parse(entry)
            except TierError as exc:
                raise ConfigError(f"archive.of_record_tiers: {exc}") from None
    if not of_record:
        return
    named = {entry.strip().lower() for entry in allowed}
    if str(tier) in named or tier.name.value in named:
        return
    raise ConfigError(
        f"codec.tier {tier} is not kept as of record here: archive.of_record is on and "
        f"archive.of_record_tiers allows only {', '.join(allowed) or 'nothing'}"
    )


@dataclass(frozen=True)
class Destination:
    """A C-MOVE destination (PS3.4 C.4.2): AE title to host and port."""

    aet: str
    host: str
    port: int
    #: Open the C-MOVE sub-association with DICOM TLS (PS3.15 B.1), with the node's certificate.
    tls: bool = False


@dataclass(frozen=True)
class WebToken:
    """A bearer token of the web server (RFC 6750): its name, SHA-256 and permissions.

    Only the token's SHA-256 (hex) is configured, so a settings file does not hold the
    secret; ``latentpacs web token NAME`` makes a token and prints its entry.
    """

    name: str
    sha256: str
    services: frozenset[str]


@dataclass(frozen=True)
class Config:
    """The resolved settings; build it with :func:`load_config`."""

    values: Mapping[str, Any]
    destinations: Mapping[str, Destination] = field(default_factory=dict)
    #: The web server's bearer tokens, by name (TOML tables ``[web.tokens.NAME]``).
    web_tokens: Mapping[str, WebToken] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    @property
    def tier(self) -> Tier:
        """The configured fidelity tier, parsed."""
        return Tier.parse(self.values["codec.tier"])

    @property
    def models_dir(self) -> Path | None:
        """The configured models directory, or None for the shipped one."""
        value = self.values["codec.models_dir"]
        return Path(value) if value else None

    @property
    def database_url(self) -> str:
        """The archive URL, defaulting to a SQLite file in the data directory."""
        url = self.values["archive.database"]
        if url:
            return str(url)
        return f"sqlite:///{Path(self.values['archive.data_dir']).resolve() / 'archive.db'}"


def _coerce(setting: Setting, value: Any, source: str) -> Any:
    if setting.type is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in (*_TRUE, *_FALSE):
            return value.strip().lower() in _TRUE
    elif setting.type is list:
        if isinstance(value, str):
            return [v for v in (p.strip() for p in value.split(",")) if v]
        if isinstance(value, list):
            return [str(v) for v in value]
    elif setting.type in (int, float) and not isinstance(value, bool):
        try:
            return setting.type(value)
        except (TypeError, ValueError):
            pass
    elif setting.type is str and isinstance(value, (str, int, float)):
        return str(value)
    raise ConfigError(f"{setting.name} from {source}: {value!r} is not a valid {setting.type.__name__}")


def _web_token(name: str, body: Any, path: Path) -> WebToken:
    where = f"{path}: [web.tokens.{name}]"
    if not isinstance(body, dict) or set(body) - {"sha256", "services"}:
        raise ConfigError(f"{where} takes sha256 and services only")
    digest = body.get("sha256")
    if not isinstance(digest, str) or len(digest) != 64 or set(digest.lower()) - set("0123456789abcdef"):
        raise ConfigError(f"{where} sha256 must be 64 hexadecimal digits (latentpacs web token {name})")
    services = body.get("services")
    if not isinstance(services, list) or not services or not all(isinstance(s, str) for s in services):
        raise ConfigError(f"{where} services must be a list of {', '.join(WEB_PERMISSIONS)}")
    unknown = set(services) - set(WEB_PERMISSIONS)
    if unknown:
        raise ConfigError(f"{where} services: {', '.join(sorted(unknown))} not among "
                          f"{', '.join(WEB_PERMISSIONS)}")
    return WebToken(name, digest.lower(), frozenset(services))


def _flatten(
    table: Mapping[str, Any], path: Path
) -> tuple[dict[str, Any], dict[str, Destination], dict[str, WebToken]]:
    values: dict[str, Any] = {}
    destinations: dict[str, Destination] = {}
    tokens: dict[str, WebToken] = {}
    for section, body in table.items():
        if not isinstance(body, dict):
            raise ConfigError(f"{path}: top-level key {section!r} must be a [section]")
        if section == "destinations":
            for aet, dest in body.items():
                if not isinstance(dest, dict) or "host" not in dest or "port" not in dest:
                    raise ConfigError(f"{path}: [destinations.{aet}] needs host and port")
                if not isinstance(dest.get("tls", False), bool):  # "false" would be truthy
                    raise ConfigError(f"{path}: [destinations.{aet}] tls must be true or false")
                destinations[aet] = Destination(
                    aet, str(dest["host"]), int(dest["port"]), dest.get("tls", False)
                )
            continue
        for key, value in body.items():
            if section == "web" and key == "tokens":
                if not isinstance(value, dict):
                    raise ConfigError(f"{path}: web.tokens must be tables [web.tokens.NAME]")
                tokens.update((n, _web_token(n, b, path)) for n, b in value.items())
                continue
            name = f"{section}.{key}"
            if name not in _BY_NAME:
                raise ConfigError(f"{path}: unknown setting {name}")
            values[name] = _coerce(_BY_NAME[name], value, str(path))
    return values, destinations, tokens


def load_config(
    path: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Resolve the settings: defaults < TOML file < environment < overrides.

    Parameters
    ----------
    path:
        A TOML file, or None.
    environ:
        The environment to read ``LATENTPACS_*`` variables from (``os.environ`` if None).
    overrides:
        Values from command-line flags, by dotted name; ``None`` values are ignored.

    Raises
    ------
    ConfigError
        For an unreadable file, an unknown setting or a value of the wrong type.
    """
    values = {s.name: s.default for s in SETTINGS}
    destinations: dict[str, Destination] = {}
    tokens: dict[str, WebToken] = {}
    if path is not None:
        try:
            table = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
        file_values, destinations, tokens = _flatten(table, Path(path))
        values.update(file_values)
    env = os.environ if environ is None else environ
    for setting in SETTINGS:
        if setting.env_var in env:
            values[setting.name] = _coerce(setting, env[setting.env_var], setting.env_var)
    for name, value in (overrides or {}).items():
        if value is None:
            continue
        if name not in _BY_NAME:
            raise ConfigError(f"unknown setting {name}")
        values[name] = _coerce(_BY_NAME[name], value, "command line")
    tier = Tier.parse(values["codec.tier"])  # fail early, with the tier's own message
    _check_of_record(tier, values["archive.of_record"], values["archive.of_record_tiers"])
    if values["archive.duplicates"] not in ("keep", "replace", "reject"):
        raise ConfigError(
            f"archive.duplicates must be keep, replace or reject, not {values['archive.duplicates']!r}"
        )
    blobs = values["archive.blobs"]
    if blobs.startswith("s3://") and not blobs[len("s3://"):].partition("/")[0]:
        raise ConfigError(f"archive.blobs {blobs!r} names no bucket (s3://bucket/prefix)")
    if "://" in blobs and not blobs.startswith("s3://"):
        raise ConfigError(f"archive.blobs {blobs!r}: a directory or s3://bucket/prefix")
    if bool(values["security.tls_cert"]) != bool(values["security.tls_key"]):
        raise ConfigError("security.tls_cert and security.tls_key must be set together")
    if values["security.tls_require_client_cert"] and not values["security.tls_ca"]:
        raise ConfigError("security.tls_require_client_cert needs security.tls_ca")
    unknown = set(values["security.unknown_peers"]) - set(SERVICES)
    if unknown:
        raise ConfigError(
            f"security.unknown_peers: {', '.join(sorted(unknown))} not among {', '.join(SERVICES)}"
        )
    for name in ("limits.max_find_answers", "limits.max_retrieve_instances",
                 "limits.max_image_pixels", "limits.max_concurrent_decodes"):
        if values[name] < 1:
            raise ConfigError(f"{name} must be at least 1, not {values[name]}")
    if values["security.tls_ca"] and not values["security.tls_cert"]:
        raise ConfigError("security.tls_ca needs security.tls_cert and security.tls_key")
    if values["web.tls"] and not values["security.tls_cert"]:
        raise ConfigError("web.tls needs security.tls_cert and security.tls_key")
    digests = [token.sha256 for token in tokens.values()]
    if len(set(digests)) != len(digests):
        raise ConfigError("two [web.tokens.*] entries have the same sha256")
    return Config(values, destinations, tokens)
