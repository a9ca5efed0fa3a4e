"""The fastest C-GET and C-MOVE a pynetdicom SCP can give: the images preloaded, nothing decoded.

Run by ``bench.py`` beside the node and Orthanc, so the node's retrieval can be compared
with the cost of sending alone (PS3.4 C.4.3 C-GET with PS3.7 D.3.3.4 role selection;
PS3.4 C.4.2 C-MOVE to the one destination it is given). With ``--fast`` it sends through
the node's own sending path (:mod:`latentpacs.node.pdata`), else through pynetdicom's.

    python benchmarks/pynetdicom_floor.py PORT [--fast] [--move-destination AET HOST PORT] FILE...
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt

VERIFICATION = "1.2.840.10008.1.1"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
PENDING = 0xFF00  # PS3.4 C.4.2.1.5 / C.4.3.1.4: sub-operations continue


def _sends(datasets: Sequence[Dataset]) -> Iterator[Any]:
    """The sub-operation count, then each dataset with Pending (the handler protocol of pynetdicom)."""
    yield len(datasets)
    for ds in datasets:
        yield PENDING, ds


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("port", type=int)
    parser.add_argument("--move-destination", nargs=3, metavar=("AET", "HOST", "PORT"))
    parser.add_argument("--fast", action="store_true", help="send through latentpacs.node.pdata")
    parser.add_argument("files", nargs="+")
    args = parser.parse_args(argv)
    datasets = [pydicom.dcmread(path) for path in args.files]
    handlers = []
    if args.fast:
        from latentpacs.node import pdata

        handlers.append(pdata.ON_ACCEPTED)
    classes = sorted({str(ds.SOPClassUID) for ds in datasets})
    syntaxes = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]

    def handle_get(event: evt.Event) -> Iterator[Any]:
        yield from _sends(datasets)

    def handle_move(event: evt.Event) -> Iterator[Any]:
        aet, host, port = args.move_destination or ("", "", "0")
        if (event.move_destination or "").strip() != aet:
            yield None, None  # Move destination unknown (A801)
            return
        yield (host, int(port), {"evt_handlers": handlers}) if handlers else (host, int(port))
        yield from _sends(datasets)

    ae = AE(ae_title="FLOOR")
    ae.add_supported_context(VERIFICATION)
    ae.add_supported_context(STUDY_ROOT_GET)
    ae.add_supported_context(STUDY_ROOT_MOVE)
    for sop_class in classes:
        ae.add_supported_context(sop_class, syntaxes, scu_role=True, scp_role=True)
        ae.add_requested_context(sop_class, syntaxes)  # the C-MOVE sub-association
    ae.start_server(("127.0.0.1", args.port),
                    evt_handlers=[(evt.EVT_C_GET, handle_get), (evt.EVT_C_MOVE, handle_move),
                                  *handlers])


if __name__ == "__main__":
    main()
