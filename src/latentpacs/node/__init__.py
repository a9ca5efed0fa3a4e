"""The DICOM node: pynetdicom AE, DIMSE handlers, destinations and access control."""
