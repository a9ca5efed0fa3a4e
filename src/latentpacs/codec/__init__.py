"""The codec: models, the latent format, model files, the inference engine, stream streams.

Submodules:

``models``     paper and compact AE/VAE architectures and their registry
``latent``     quantisation of latents to bytes (what every bit count counts)
``modelfile``  safetensors weights + JSON card, identity = SHA-256 of the weights
``engine``     the thread-safe batching inference engine (CUDA or CPU; mixed precision
               for encoding only)
``integer``    the integer-valued decoder: the same latent gives the same pixels on any
               device, thread count or batch size
``stream``   JPEG-LS streams of the lossless and near-lossless tiers
``tiers``      the fidelity tiers

The names below are imported lazily, so ``latentpacs.codec.tiers`` and
``latentpacs.codec.jpegls`` can be used without importing torch. The codec knows
nothing of DICOM networking or SQL.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from latentpacs.codec.engine import Engine, resize_bilinear
    from latentpacs.codec.latent import LatentFormat, calibrate
    from latentpacs.codec.modelfile import (
        LoadedModel,
        ModelCard,
        default_models_dir,
        find_model_by_sha256,
        list_models,
        load_model,
        save_model,
        sha256_file,
    )
    from latentpacs.codec.models import (
        ARCHITECTURES,
        LatentAutoencoder,
        ModelOutput,
        build_model,
        count_parameters,
    )
    from latentpacs.codec.jpegls import decode_stream, encode_stream

_EXPORTS = {
    "ARCHITECTURES": "models",
    "LatentAutoencoder": "models",
    "ModelOutput": "models",
    "build_model": "models",
    "count_parameters": "models",
    "LatentFormat": "latent",
    "calibrate": "latent",
    "LoadedModel": "modelfile",
    "ModelCard": "modelfile",
    "default_models_dir": "modelfile",
    "find_model_by_sha256": "modelfile",
    "list_models": "modelfile",
    "load_model": "modelfile",
    "save_model": "modelfile",
    "sha256_file": "modelfile",
    "Engine": "engine",
    "resize_bilinear": "engine",
    "decode_stream": "stream",
    "encode_stream": "stream",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    """Import the submodule that defines ``name`` on first use (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
