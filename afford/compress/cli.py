"""`afford compress` / `afford decompress`: a file through the language-model coder (afford/compress/text.py),
and `afford compress --bench` (afford/compress/bench.py)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from afford.compress import BATCH, CONTEXT, OVERLAP
from afford.config import ConfigError, number_arg


def add_parsers(sub) -> None:
    c = sub.add_parser("compress", help="lossless compression with a language model (range-coded against its "
                                        "next-token probabilities); --bench: against gzip, xz, zstd")
    c.add_argument("file", nargs="?", help="any file (bytes need not be text); - reads standard input")
    c.add_argument("-o", "--out", help="output path (default FILE.afz; standard output for -)")
    c.add_argument("--model", default="default", help="model folder or 'default' (the bundled target)")
    c.add_argument("--context", type=number_arg(int, 2), default=CONTEXT,
                   help="positions per window, BOS included (the bundled models trained on 256)")
    c.add_argument("--batch", type=number_arg(int, 1), default=BATCH, help="lanes of the input decoded together")
    c.add_argument("--overlap", type=number_arg(int, 0), default=OVERLAP,
                   help="tokens of preceding text each window re-reads as context (0: independent chunks)")
    c.add_argument("--device", default="auto")
    c.add_argument("--force", action="store_true", help="overwrite the output file")
    c.add_argument("--bench", action="store_true",
                   help="bits/byte and speed on held-out text and bits/dim on 8x8 digits, against gzip/xz/zstd")
    c.add_argument("--bench-bytes", type=number_arg(int, 1), help="--bench: the first N bytes of each text file")
    c.add_argument("--data", default="data", help="--bench: the folder holding tinyshakespeare/ and gsm8k/")
    c.add_argument("--json", help="--bench: also write the results here")
    d = sub.add_parser("decompress", help="restore a file written by `afford compress` (bit-exact, or an error)")
    d.add_argument("file", help="a .afz file; - reads standard input")
    d.add_argument("-o", "--out", help="output path (default: FILE without .afz; standard output for -)")
    d.add_argument("--model", default="default", help="the model it was compressed with")
    d.add_argument("--device", default="auto", help="auto: the kind of device that compressed it")
    d.add_argument("--force", action="store_true", help="overwrite the output file")


def _read(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path} is not a file")
    try:
        return p.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from None


def _check_out(path: str, force: bool) -> None:
    """Before any model runs: the output can be written."""
    if path == "-":
        return
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{path} is a folder; give a file path with -o")
    if p.exists() and not force:
        raise ConfigError(f"{path} exists; pass --force to overwrite it or -o to write elsewhere")
    if not p.parent.is_dir():
        raise ConfigError(f"the folder of {path} does not exist")


def _write(path: str, data: bytes) -> None:
    if path == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    try:
        Path(path).write_bytes(data)
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e.strerror or e}") from None


def cmd_compress(a) -> int:
    if a.bench:
        return _bench(a)
    if not a.file:
        raise ConfigError("give a FILE to compress (or --bench)")
    from afford.compress.text import LMCodec
    data = _read(a.file)
    out = a.out or ("-" if a.file == "-" else a.file + ".afz")
    _check_out(out, a.force)
    codec = LMCodec(a.model, context=a.context, batch=a.batch, overlap=a.overlap, device=a.device)
    blob = codec.compress(data)
    _write(out, blob)
    s = codec.stats
    print(f"{a.file}: {len(data):,} bytes -> {out}: {len(blob):,} bytes ({8 * len(blob) / max(len(data), 1):.3f} "
          f"bits/byte; the model's cross-entropy {s.model_bits / max(len(data), 1):.3f}), {s.tokens:,} tokens, "
          f"{s.seconds:.1f} s ({s.bytes_per_second:,.0f} bytes/s)", file=sys.stderr if out == "-" else sys.stdout)
    return 0


def cmd_decompress(a) -> int:
    from afford.compress.container import unpack
    from afford.compress.text import LMCodec
    blob = _read(a.file)
    header, _ = unpack(blob, a.file)
    out = a.out or ("-" if a.file == "-" else a.file[:-4] if a.file.endswith(".afz") else a.file + ".out")
    _check_out(out, a.force)
    import torch
    torch.set_num_threads(header["threads"])          # the compressing run's thread count, as far as it matters
    codec = LMCodec(a.model, context=header["context"], batch=header["batch"], overlap=header["overlap"],
                    device=header["device"] if a.device == "auto" else a.device, dtype=header["dtype"])
    data = codec.decompress(blob, a.file)
    _write(out, data)
    s = codec.stats
    print(f"{a.file} -> {out}: {len(data):,} bytes, {s.seconds:.1f} s ({s.bytes_per_second:,.0f} bytes/s)",
          file=sys.stderr if out == "-" else sys.stdout)
    return 0


def _bench(a) -> int:
    from afford.compress.bench import run as run_bench
    results, _ = run_bench(a.data, a.bench_bytes, a.model, a.context, a.batch, a.overlap)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


def run(a) -> int:
    return {"compress": cmd_compress, "decompress": cmd_decompress}[a.cmd](a)

