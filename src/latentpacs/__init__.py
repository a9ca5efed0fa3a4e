"""latentpacs: a DICOM node that archives mammograms as learned latents."""

__version__ = "0.1.0"
