"""The .afz file: what a decompressor needs to rebuild the input bit for bit, and to refuse when it cannot.

    b"AFZ" + format version (1 byte) | header length (u32 LE) | header (HEADER fields, little-endian, then
    the torch version) | CRC-32 of header + payload (u32 LE) | payload (the range coder's uint32 words, LE)

The header names the model (128 bits of a SHA-256 over its weights, config and tokenizer) and the settings that fix the
computation path (context, batch, dtype, device type), the token and byte counts, and a SHA-256 of the
original bytes; the CRC catches a damaged file before any decoding, the original's hash any mis-decoding after it.
"""
from __future__ import annotations

import hashlib
import struct
import zlib
from pathlib import Path

import numpy as np

from afford.config import ConfigError

MAGIC = b"AFZ"
VERSION = 1


class CorruptFile(ConfigError):
    """The file is not an intact .afz file (or was decoded against a different model / computation)."""


# (name, struct code), then the torch version: 69 + 1 + its length bytes (80 for "2.13.0+cpu"), 92 with the
# framing -- a small file's header is part of its size
HEADER = (("model", "16s"), ("sha256", "16s"), ("bytes", "Q"), ("tokens", "Q"), ("context", "I"), ("batch", "I"),
          ("overlap", "I"),
          ("bos", "I"), ("precision", "B"), ("dtype", "B"), ("device", "B"), ("threads", "H"))
_FMT = "<" + "".join(code for _, code in HEADER)
DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("cpu", "cuda", "mps")


def _encode_header(h: dict) -> bytes:
    vals = {**h, "model": bytes.fromhex(h["model"]), "sha256": bytes.fromhex(h["sha256"]),
            "dtype": DTYPES.index(h["dtype"]), "device": DEVICES.index(h["device"])}
    torch_version = h["torch"].encode()[:255]
    return struct.pack(_FMT, *(vals[k] for k, _ in HEADER)) + bytes([len(torch_version)]) + torch_version


def _decode_header(b: bytes) -> dict:
    n = struct.calcsize(_FMT)
    h = dict(zip((k for k, _ in HEADER), struct.unpack_from(_FMT, b)))
    h.update(model=h["model"].hex(), sha256=h["sha256"].hex(), dtype=DTYPES[h["dtype"]], device=DEVICES[h["device"]],
             torch=b[n + 1:n + 1 + b[n]].decode())
    return h


def pack(header: dict, words: np.ndarray) -> bytes:
    """header: the HEADER fields (model and sha256 as 32 hex digits) and "torch"."""
    head = _encode_header(header)
    payload = np.ascontiguousarray(words, dtype="<u4").tobytes()
    crc = zlib.crc32(head + payload)
    return MAGIC + bytes([VERSION]) + struct.pack("<I", len(head)) + head + struct.pack("<I", crc) + payload


def unpack(blob: bytes, name: str = "input") -> tuple[dict, np.ndarray]:
    if blob[:3] != MAGIC:
        raise CorruptFile(f"{name} is not an afford-compressed file (it does not start with {MAGIC!r}); "
                          f"make one with `afford compress`")
    if len(blob) < 4 or blob[3] != VERSION:
        raise CorruptFile(f"{name} is format version {blob[3] if len(blob) > 3 else '?'}; this afford reads "
                          f"version {VERSION}: decompress it with the afford release that wrote it")
    if len(blob) < 8:
        raise CorruptFile(f"{name} is truncated ({len(blob)} bytes)")
    (n,) = struct.unpack_from("<I", blob, 4)
    if len(blob) < 12 + n or (len(blob) - 12 - n) % 4:
        raise CorruptFile(f"{name} is truncated or damaged: its header says {n} header bytes, the file has "
                          f"{len(blob)} bytes in all")
    head, (crc,), payload = blob[8:8 + n], struct.unpack_from("<I", blob, 8 + n), blob[12 + n:]
    if zlib.crc32(head + payload) != crc:
        raise CorruptFile(f"{name} is damaged: its checksum does not match (a changed or truncated byte); "
                          f"it cannot be decompressed")
    try:
        header = _decode_header(head)
    except (struct.error, IndexError, UnicodeDecodeError) as e:    # only if the CRC collided as well
        raise CorruptFile(f"{name} has an unreadable header: {e}") from e
    return header, np.frombuffer(payload, dtype="<u4").astype(np.uint32)


def sha256(data: bytes) -> str:
    """The first 128 bits of the SHA-256, in hex: what the header keeps of the original."""
    return hashlib.sha256(data).hexdigest()[:32]


def model_identity(path: Path) -> str:
    """SHA-256 over the files that decide a model's probabilities: weights, config, every tokenizer file."""
    h = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if p.is_file() and (
        p.suffix in (".safetensors", ".bin") or p.name == "config.json"
        or p.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "added_tokens"))))
    for p in files:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()
