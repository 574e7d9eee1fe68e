"""Lossless compression (issue #22): the bundled target as a text coder and an HCLT circuit on 8x8 digits,
against gzip -9, xz -9e and zstd -19 on the same bytes, and against each model's own cross-entropy.

    python benchmarks/compress.py                 # -> results/compress.json (about 15 minutes on 2 cores)
    python benchmarks/compress.py --bytes 20000   # the first 20 kB of each text file

Every size is a real file round trip: compress, decompress, compare with the original. The sweeps run on one
slice of each held-out text, one round trip per setting: window overlap (0 = independent chunks) and batch
(lanes decoded together)."""
from __future__ import annotations

import argparse
import sys

from common import ROOT, save

sys.path.insert(0, str(ROOT))
from afford.compress import BATCH, OVERLAP  # noqa: E402
from afford.compress.bench import bench_text, run  # noqa: E402

KEEP = ("file", "batch", "overlap", "bytes", "compressed_bytes", "bits_per_byte", "model_bits_per_byte",
        "x_smaller_than_xz", "encode_bytes_per_s", "decode_bytes_per_s", "forwards")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bytes", type=int, help="the first N bytes of each text file (default: all)")
    ap.add_argument("--sweep-bytes", type=int, default=16000, help="slice for the sweeps (0: skip them)")
    ap.add_argument("--overlaps", default="0,32,64,128")
    ap.add_argument("--batches", default="1,4,16,32")
    a = ap.parse_args()
    results, corpora = run(ROOT / "data", a.bytes)
    results.update(overlap_sweep=[], batch_sweep=[])
    if a.sweep_bytes:
        for name, data in corpora.items():
            for ov in map(int, a.overlaps.split(",")):
                r = bench_text(name, data[:a.sweep_bytes], overlap=ov)
                results["overlap_sweep"].append({k: r[k] for k in KEEP})
                print(f"{name} overlap {ov}: {r['bits_per_byte']:.3f} bits/byte ({r['x_smaller_than_xz']:.2f}x xz), "
                      f"decode {r['decode_bytes_per_s']:,.0f} B/s", flush=True)
        data = corpora["gsm8k_test"][:a.sweep_bytes]
        for b in map(int, a.batches.split(",")):
            r = bench_text("gsm8k_test", data, batch=b)
            results["batch_sweep"].append({k: r[k] for k in KEEP})
            print(f"batch {b}: decode {r['decode_bytes_per_s']:,.0f} B/s, encode {r['encode_bytes_per_s']:,.0f} B/s",
                  flush=True)
    results["defaults"] = {"batch": BATCH, "overlap": OVERLAP}
    print(save("compress", {"command": " ".join(["python", "benchmarks/compress.py", *sys.argv[1:]]), **results}))


if __name__ == "__main__":
    main()
