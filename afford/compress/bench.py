"""`afford compress --bench` and benchmarks/compress.py: bits per byte (text, the language model) and bits per
dimension (8x8 digits, the circuit), encode and decode speed, against gzip -9, xz -9e and zstd -19 on the same
bytes (Python's gzip and lzma modules and the zstandard package: the same algorithms at the same levels), and
against each model's own cross-entropy (the coder's overhead)."""
from __future__ import annotations

import gzip
import lzma
import time
from pathlib import Path

import numpy as np

from afford.compress import BATCH, CONTEXT, OVERLAP
from afford.config import ConfigError


def baselines(data: bytes) -> dict[str, int]:
    """Compressed sizes in bytes."""
    out = {"gzip -9": len(gzip.compress(data, 9)),
           "xz -9e": len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))}
    try:
        import zstandard
        out["zstd -19"] = len(zstandard.ZstdCompressor(level=19).compress(data))
    except ImportError:                          # an optional extra: `pip install afford[compress]`
        pass
    return out


def text_corpora(data_dir: str | Path = "data", limit: int | None = None) -> dict[str, bytes]:
    """The held-out text the bundled target never trained on: the last 5 % of Tiny Shakespeare (the zoo's
    split) and GSM8K test (question and answer of each record, as the zoo reads them)."""
    from afford.zoo.data import read_documents, split_documents
    d = Path(data_dir)
    shakespeare, gsm = d / "tinyshakespeare" / "input.txt", d / "gsm8k" / "test.jsonl"
    for p in (shakespeare, gsm):
        if not p.is_file():
            raise ConfigError(f"{p} not found: run from the repository root (its data/ folder) or pass --data DIR")
    out = {"shakespeare_heldout": "".join(split_documents([shakespeare], 0.05).val).encode(),
           "gsm8k_test": "\n".join(read_documents(gsm)).encode()}
    return {k: v[:limit] if limit else v for k, v in out.items()}


def bench_text(name: str, data: bytes, model: str = "default", context: int = CONTEXT, batch: int = BATCH,
               overlap: int = OVERLAP) -> dict:
    from afford.compress.text import LMCodec
    codec = LMCodec(model, context=context, batch=batch, overlap=overlap)
    blob = codec.compress(data)
    enc = codec.stats
    out = codec.decompress(blob)
    if out != data:
        raise RuntimeError(f"{name}: the round trip is not exact")
    dec = codec.stats
    n = len(data)
    base = baselines(data)
    return {"file": name, "bytes": n, "tokens": enc.tokens, "compressed_bytes": len(blob),
            "bits_per_byte": 8 * len(blob) / n, "payload_bits_per_byte": enc.payload_bits / n,
            "model_bits_per_byte": enc.model_bits / n, "quantized_bits_per_byte": enc.quantized_bits / n,
            "coder_overhead": enc.payload_bits / enc.model_bits - 1 if enc.model_bits else 0.0,
            "encode_bytes_per_s": n / enc.seconds, "decode_bytes_per_s": n / dec.seconds,
            "encode_s": enc.seconds, "decode_s": dec.seconds, "forwards": dec.forwards,
            "context": context, "batch": batch, "overlap": overlap,
            "baselines_bits_per_byte": {k: 8 * v / n for k, v in base.items()},
            "x_smaller_than_xz": base["xz -9e"] / len(blob)}


def digits_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits (no download), values 0..16; 80 % train, 20 % test, shuffled once."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ConfigError("the digits benchmark needs scikit-learn: pip install 'afford[compress]'") from None
    x = load_digits().data.astype(np.int64)                                   # (1797, 64)
    perm = np.random.default_rng(seed).permutation(len(x))
    cut = int(0.8 * len(x))
    return x[perm[:cut]], x[perm[cut:]]


def bench_digits(hidden: int = 16, iters: int = 60) -> dict:
    from afford.compress.circuit import bits_per_dim, compress_images, decompress_images, fit
    train, test = digits_split()
    t = time.perf_counter()
    model, history = fit(train, 17, hidden=hidden, iters=iters)
    fit_s = time.perf_counter() - t
    nll = bits_per_dim(model, test)
    t = time.perf_counter()
    words, cond = compress_images(model, test)
    enc_s = time.perf_counter() - t
    t = time.perf_counter()
    back = decompress_images(model, words, len(test))
    dec_s = time.perf_counter() - t
    if not np.array_equal(back, test):
        raise RuntimeError("digits: the round trip is not exact")
    dims = test.size
    coded = 32 * len(words) / dims
    base = baselines(test.astype(np.uint8).tobytes())                       # one byte per pixel
    return {"images": len(test), "dims": dims, "hidden": hidden, "em_iters": iters, "fit_s": fit_s,
            "train_bits_per_dim": history[-1], "nll_bits_per_dim": nll, "bits_per_dim": coded,
            "over_nll": coded / nll - 1, "encode_s": enc_s, "decode_s": dec_s,
            "pixels_per_s_decode": dims / dec_s,
            "node_evals_per_conditional": cond.evaluations / model.num_vars,     # per pixel, for the whole batch
            "tree_nodes": model.num_vars, "tree_height": int(model.depth.max()),
            "mean_depth": float(model.depth.mean()),
            "baselines_bits_per_dim": {k: 8 * v / dims for k, v in base.items()}}


def run(data_dir: str | Path = "data", limit: int | None = None, model: str = "default", context: int = CONTEXT,
        batch: int = BATCH, overlap: int = OVERLAP) -> tuple[dict, dict[str, bytes]]:
    """Every held-out text file and the digits, each line printed as it is measured; also returns the texts."""
    results = {"text": [], "digits": None}
    corpora = text_corpora(data_dir, limit)
    for name, data in corpora.items():
        results["text"].append(bench_text(name, data, model, context, batch, overlap))
        print(report({"text": results["text"][-1:]}), flush=True)
    results["digits"] = bench_digits()
    print(report({"digits": results["digits"]}), flush=True)
    return results, corpora


def report(results: dict) -> str:
    lines = []
    for r in results.get("text", []):
        b = r["baselines_bits_per_byte"]
        lines.append(f"{r['file']}: {r['bytes']:,} bytes -> {r['compressed_bytes']:,} ({r['bits_per_byte']:.3f} bits/byte; "
                     f"model cross-entropy {r['model_bits_per_byte']:.3f}, coder overhead {r['coder_overhead']:+.2%}) | "
                     + " ".join(f"{k} {v:.3f}" for k, v in b.items())
                     + f" | {r['x_smaller_than_xz']:.2f}x smaller than xz -9e | encode {r['encode_bytes_per_s']:,.0f} B/s, "
                       f"decode {r['decode_bytes_per_s']:,.0f} B/s")
    if d := results.get("digits"):
        b = d["baselines_bits_per_dim"]
        lines.append(f"digits (HCLT, H={d['hidden']}): {d['bits_per_dim']:.3f} bits/dim coded, NLL {d['nll_bits_per_dim']:.3f} "
                     f"({d['over_nll']:+.2%}) | " + " ".join(f"{k} {v:.3f}" for k, v in b.items())
                     + f" | {d['node_evals_per_conditional']:.1f} node evaluations per conditional (of {d['tree_nodes']}), "
                       f"decode {d['pixels_per_s_decode']:,.0f} pixels/s")
    return "\n".join(lines)
