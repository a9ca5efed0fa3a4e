"""The files in deploy/ work as shipped: node configuration, Orthanc pairing, PostgreSQL set-up.

Only what a machine-specific install must change is rewritten (ports, directories, the
plugin folder, the calling AE titles of the test's own DCMTK probes). Orthanc, started
with ``deploy/orthanc.json``, sends a study to the node started with
``deploy/latentpacs.toml``, then asks the node (C-MOVE, PS3.4 C.4.2) to send the
reconstructions back to it: the pairing both ways. ``deploy/postgres-setup.sh`` runs
against the test's PostgreSQL server and prints a URL the node's archive accepts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psycopg
import pydicom
import pytest

from dicomtools import require
from latentpacs import phantom
from latentpacs.config import load_config
from netpeers import HOST, Orthanc, free_port, start_node, wait_for_echo

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
START_TIMEOUT_S = 60.0


def _node_config(folder: Path, orthanc_port: int) -> Path:
    text = (DEPLOY / "latentpacs.toml").read_text()
    text = text.replace('data_dir = "/var/lib/latentpacs"', f'data_dir = "{folder / "data"}"')
    text = text.replace('host = "0.0.0.0"', f'host = "{HOST}"')
    text = text.replace("port = 4242", f"port = {orthanc_port}")
    config = folder / "latentpacs.toml"
    config.write_text(text)
    return config


def _start_orthanc(folder: Path, node_port: int, dicom_port: int) -> Orthanc:
    settings = json.loads((DEPLOY / "orthanc.json").read_text())
    http_port = free_port()
    settings.update(HttpPort=http_port, DicomPort=dicom_port, Plugins=[],
                    StorageDirectory=str(folder / "db"), IndexDirectory=str(folder / "db"))
    settings["DicomModalities"]["latentpacs"][2] = node_port
    (folder / "orthanc.json").write_text(json.dumps(settings))
    log = folder / "orthanc.log"
    with log.open("ab") as handle:
        proc = subprocess.Popen([require("Orthanc"), "--no-jobs", str(folder / "orthanc.json")],
                                stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=folder)
    orthanc = Orthanc(http_port=http_port, dicom_port=dicom_port, aet=settings["DicomAet"],
                      proc=proc, workdir=folder)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"Orthanc exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"http://{HOST}:{http_port}/system", timeout=5):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    pytest.fail(f"Orthanc did not answer:\n{log.read_text()[-4000:]}")
                time.sleep(0.2)
        wait_for_echo(dicom_port, orthanc.aet, proc=proc, log=log)
    except BaseException:
        orthanc.stop()
        raise
    return orthanc


def test_example_configuration_loads() -> None:
    config = load_config(DEPLOY / "latentpacs.toml", environ={})
    assert config["node.aet"] == "LATENTPACS" and "ORTHANC" in config.destinations
    assert config["security.allowed_calling_aets"] == ["ORTHANC", "MODALITY1"]


def test_orthanc_and_the_node_are_paired_both_ways(tmp_path) -> None:
    (tmp_path / "node").mkdir()
    (tmp_path / "orthanc").mkdir()
    orthanc_port = free_port()
    config = _node_config(tmp_path / "node", orthanc_port)
    # The harness probes with DCMTK's default AE titles; the shipped list admits only ORTHANC.
    env = {"LATENTPACS_SECURITY_ALLOWED_CALLING_AETS": "ORTHANC,ECHOSCU"}
    with start_node(config, env=env) as node, \
            _start_orthanc(tmp_path / "orthanc", node.port, orthanc_port) as orthanc:
            files = phantom.generate(tmp_path / "phantoms", 2, seed=61, size=(64, 52),
                                     images_per_study=2)
            ids = [orthanc.upload(path) for path in files]
            sent = orthanc.store_to("latentpacs", ids)
            assert sent.get("FailedInstancesCount", 0) == 0
            study = pydicom.dcmread(files[0]).StudyInstanceUID
            orthanc.rest("POST", "/modalities/latentpacs/move",
                         {"Level": "Study", "Resources": [{"StudyInstanceUID": study}],
                          "TargetAet": orthanc.aet, "Synchronous": True})
            received = [orthanc.instance_tags(oid) for oid in orthanc.instances() if oid not in ids]
            assert len(received) == 2
            assert {tags["LossyImageCompression"] for tags in received} == {"01"}


def test_postgres_setup_script_prints_a_working_archive_url(postgres_server) -> None:
    env = {**os.environ, "PSQL": require("psql"), "PGHOST": HOST, "PGPORT": str(postgres_server),
           "PGUSER": "postgres", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run(["bash", str(DEPLOY / "postgres-setup.sh"), "lp_deploy", "lp_node"],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    url = result.stdout.strip().splitlines()[-1]
    assert url.startswith(f"postgresql+psycopg://lp_node:") and url.endswith(f":{postgres_server}/lp_deploy")
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as connection:
        owner = connection.execute("SELECT pg_get_userbyid(datdba) FROM pg_database "
                                   "WHERE datname = 'lp_deploy'").fetchone()
        version = connection.execute("SELECT version_num FROM alembic_version").fetchone()
    assert owner == ("lp_node",) and version is not None
    again = subprocess.run(["bash", str(DEPLOY / "postgres-setup.sh"), "lp_deploy", "lp_node"],
                           capture_output=True, text=True, timeout=120, env=env)
    assert again.returncode == 0, again.stderr  # idempotent: a second run sets a new password
