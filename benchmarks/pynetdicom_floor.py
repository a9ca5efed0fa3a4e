"""The fastest C-GET a pynetdicom SCP can give: the images preloaded, nothing decoded.

Run by ``bench.py`` beside the node and Orthanc, so the node's C-GET can be compared with
the cost of pynetdicom's own sending (PS3.4 C.4.3, PS3.7 D.3.3.4 role selection).

    python benchmarks/pynetdicom_floor.py PORT FILE...
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt

VERIFICATION = "1.2.840.10008.1.1"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"


def main(argv: list[str]) -> None:
    port, paths = int(argv[0]), argv[1:]
    datasets = [pydicom.dcmread(path) for path in paths]
    classes = {str(ds.SOPClassUID) for ds in datasets}

    def handle_get(event: evt.Event) -> Iterator[Any]:
        yield len(datasets)
        for ds in datasets:
            yield 0xFF00, ds  # Pending: send this one

    ae = AE(ae_title="FLOOR")
    ae.add_supported_context(VERIFICATION)
    ae.add_supported_context(STUDY_ROOT_GET)
    for sop_class in classes:
        ae.add_supported_context(
            sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian], scu_role=True, scp_role=True
        )
    ae.start_server(("127.0.0.1", port), evt_handlers=[(evt.EVT_C_GET, handle_get)])


if __name__ == "__main__":
    main(sys.argv[1:])
