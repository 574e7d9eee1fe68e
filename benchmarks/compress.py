"""Lossless compression (issue #22): the bundled target as a text coder and an HCLT circuit on 8x8 digits,
against gzip -9, xz -9e and zstd -19 on the same bytes, and against each model's own cross-entropy.

    python benchmarks/compress.py                 # -> results/compress.json (about 8 minutes on 2 cores)
    python benchmarks/compress.py --bytes 20000   # the first 20 kB of each text file

Every size is a real file round trip: compress, decompress, compare with the original. Decode speed by
batch (chunks decoded together) is measured on one slice of GSM8K test text, each batch size one round trip."""
from __future__ import annotations

import argparse
import sys

from common import ROOT, save

sys.path.insert(0, str(ROOT))
from afford.compress.bench import bench_digits, bench_text, report, text_corpora  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bytes", type=int, help="the first N bytes of each text file (default: all)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--sweep-bytes", type=int, default=12000, help="slice for the batch sweep (0: skip it)")
    ap.add_argument("--sweep", default="1,4,16,32")
    a = ap.parse_args()
    results = {"text": [], "digits": None, "batch_sweep": []}
    corpora = text_corpora(ROOT / "data", a.bytes)
    for name, data in corpora.items():
        results["text"].append(bench_text(name, data, batch=a.batch))
        print(report({"text": results["text"][-1:]}), flush=True)
    results["digits"] = bench_digits()
    print(report({"digits": results["digits"]}), flush=True)
    if a.sweep_bytes:
        data = corpora["gsm8k_test"][:a.sweep_bytes]
        for b in map(int, a.sweep.split(",")):
            r = bench_text("gsm8k_test_slice", data, batch=b)
            results["batch_sweep"].append({k: r[k] for k in ("batch", "bytes", "compressed_bytes", "encode_bytes_per_s",
                                                             "decode_bytes_per_s", "forwards")})
            print(f"batch {b}: decode {r['decode_bytes_per_s']:,.0f} B/s, encode {r['encode_bytes_per_s']:,.0f} B/s, "
                  f"{r['compressed_bytes']:,} bytes", flush=True)
    print(save("compress", {"command": " ".join(["python", "benchmarks/compress.py", *sys.argv[1:]]), **results}))


if __name__ == "__main__":
    main()
