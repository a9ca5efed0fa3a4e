"""A node with its web server for DICOMweb tests: tokens, URLs and real HTTP clients.

:func:`start_web_node` writes a node configuration with one bearer token per entry of
``tokens`` (name -> permissions; the secret is made here and only its SHA-256 goes into
the TOML file, as ``latentpacs web token`` does), starts ``latentpacs serve`` through
:func:`netpeers.start_node` (web server on an OS-assigned loopback port) and yields a
:class:`WebNode`. Requests go over real HTTP: :meth:`WebNode.request` with urllib, and
:meth:`WebNode.client` with ``dicomweb-client`` (the reference Python client).
"""

from __future__ import annotations

import hashlib
import secrets
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicomweb_client.api import DICOMwebClient

from netpeers import NodeProcess, start_node
from test_node import write_config

#: Every permission a token can carry.
ALL = ("store", "query", "retrieve", "metrics")
#: The default tokens: one that may do everything, one that may only query.
DEFAULT_TOKENS: Mapping[str, Sequence[str]] = {"admin": ALL, "reader": ("query",)}


@dataclass(frozen=True)
class HttpAnswer:
    """One HTTP answer: status, headers (lower-case names) and body."""

    status: int
    headers: Mapping[str, str]
    body: bytes


@dataclass
class WebNode:
    """A running node with its web server, and the secrets of its tokens by name."""

    node: NodeProcess
    tokens: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """The web server's base URL (``http://127.0.0.1:PORT``)."""
        return self.node.web_url

    @property
    def dicomweb(self) -> str:
        """The DICOMweb base URL (``.../dicom-web``)."""
        return self.url + "/dicom-web"

    def auth(self, token: str | None = "admin") -> dict[str, str]:
        """The Authorization header of token ``token`` (none for None)."""
        return {} if token is None else {"Authorization": f"Bearer {self.tokens[token]}"}

    def client(self, token: str | None = "admin") -> DICOMwebClient:
        """A dicomweb-client session on this node with ``token``'s bearer header."""
        return DICOMwebClient(self.dicomweb, headers=self.auth(token))

    def request(self, method: str, path: str, *, token: str | None = "admin",
                headers: Mapping[str, str] | None = None, body: bytes | None = None,
                timeout: float = 120.0) -> HttpAnswer:
        """``method path`` (relative to the server's root) over HTTP; any status is returned."""
        request = urllib.request.Request(self.url + path, data=body, method=method,
                                         headers={**self.auth(token), **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as answer:
                return HttpAnswer(answer.status, {k.lower(): v for k, v in answer.headers.items()},
                                  answer.read())
        except urllib.error.HTTPError as error:
            return HttpAnswer(error.code, {k.lower(): v for k, v in error.headers.items()}, error.read())


def token_entries(tokens: Mapping[str, Sequence[str]]) -> tuple[dict[str, str], dict[str, dict[str, object]]]:
    """Fresh secrets for ``tokens`` and their ``[web.tokens.NAME]`` sections for write_config."""
    secrets_by_name = {name: secrets.token_urlsafe(24) for name in tokens}
    sections: dict[str, dict[str, object]] = {
        f"web.tokens.{name}": {"sha256": hashlib.sha256(secret.encode()).hexdigest(),
                               "services": list(tokens[name])}
        for name, secret in secrets_by_name.items()
    }
    return secrets_by_name, sections


@contextmanager
def start_web_node(workdir: Path, *, tier: str = "lossless", database: str | None = None,
                   tokens: Mapping[str, Sequence[str]] = DEFAULT_TOKENS,
                   **sections: dict[str, Any]) -> Iterator[WebNode]:
    """Start a node (tier ``tier``, SQLite in ``workdir`` unless ``database``) with its web server.

    ``sections`` are more TOML sections for :func:`test_node.write_config`, e.g.
    ``web={"trust_loopback": True}`` or ``limits={"max_find_answers": 2}``.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    secrets_by_name, token_sections = token_entries(tokens)
    codec = {"tier": tier, **sections.pop("codec", {})}
    config = write_config(workdir, database or f"sqlite:///{workdir / 'archive.db'}",
                          codec=codec, **token_sections, **sections)
    with start_node(config) as node:
        if node.web_port is None:
            raise RuntimeError("the node started without its web server")
        yield WebNode(node, secrets_by_name)
