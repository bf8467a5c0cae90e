"""Wire identifiers: codec architectures, latent spaces, metadata keys (numpy-free constants)."""

from __future__ import annotations

import zlib
from collections.abc import Sequence

__all__ = ["CODEC_IDS", "LATENT_SPACE_IDS", "SUBSCRIBED_METADATA_KEY", "EDGE_BUNDLE_FORMATS", "codec_name",
           "latent_space_name", "label_set_hash"]

# codec architecture -> codec_id in the packet header (and the SessionHeader). 100 and up are not LCF codecs:
# "jpeg" is the JPEG baseline of `latentcast bench stream` (each packet a whole frame as JPEG bytes), which a
# cloud accepts only when its pipeline.codecs lists it (cloud/decode.py)
CODEC_IDS: dict[str, int] = {"elic-lite": 1, "elic-paper": 2, "elic-lite-taef2": 3, "jpeg": 100}
# latent-space family -> latent_space_id in the packet header
LATENT_SPACE_IDS: dict[str, int] = {"taef2": 1, "taesd": 2, "sd-vae": 3, "pixels": 4}
# initial metadata key the cloud sends once a Subscribe call is registered (a refused call ends without it)
SUBSCRIBED_METADATA_KEY = "latentcast-subscribed"
# the edge bundle's manifest "format" (models/export.py writes the last, edge/encoder.py reads all): 2 adds
# analysis_linear (y = the last analysis stage's output + that graph's, cell by cell); 3 adds entropy.onnx's input
# rdoq (the encoder's rate-distortion optimized choice of symbols, proto.symbols.quantize_y)
EDGE_BUNDLE_FORMATS = ("latentcast-edge-bundle-1", "latentcast-edge-bundle-2", "latentcast-edge-bundle-3")


def _reverse(table: dict[str, int], value: int, what: str) -> str:
    for k, v in table.items():
        if v == value:
            return k
    valid = ", ".join(f"{v}={k}" for k, v in table.items())
    raise ValueError(f"unknown {what} {value} (valid: {valid})")


def codec_name(codec_id: int) -> str:
    return _reverse(CODEC_IDS, codec_id, "codec_id")


def latent_space_name(latent_space_id: int) -> str:
    return _reverse(LATENT_SPACE_IDS, latent_space_id, "latent_space_id")


def label_set_hash(labels: Sequence[str]) -> bytes:
    """The packet header's 4-byte ``label_set_hash``: CRC32 (big-endian) of the task's label list,
    in order, joined by newlines. ROI ``label_id`` values index that list, so the cloud can check
    that a packet's label ids mean what its session header says."""
    return zlib.crc32("\n".join(labels).encode("utf-8")).to_bytes(4, "big")
