"""Probe (issue #13's int4 goal): GemLite's int4 GEMV against torch's tinygemm and cuBLAS bf16 on the
1.1 B Llama's four matrices, one row (a batch-1 decode step), each timed as 20 calls inside one CUDA graph
(launches excluded, as in afford's captured step). GemLite (https://github.com/mobiusml/gemlite, Triton) is
not an afford dependency: this measures whether wiring it in could take int4 at batch 1 to 1.5x bf16,
which tinygemm (~1 TB/s of codes in the model's step) and afford's own Triton kernels did not.

Same weights for every kernel: int4 codes with a scale and zero point per 128 columns (tinygemm's group),
w = (q - 8) * s + z; GemLite gets them in its fused-multiply-add form w = q * s + (z - 8 s).
Usage: PYTHONPATH=<gemlite's folder> python benchmarks/gemlite_probe.py --out DIR
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from afford.models.quant import QuantLinear, _graph_us, dequantize, quantize  # noqa: E402

MATS = {"qkv": (2560, 2048), "o": (2048, 2048), "gate_up": (11264, 2048), "down": (2048, 5632)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--group", type=int, default=128)
    a = ap.parse_args()
    t0 = time.perf_counter()
    import gemlite
    from gemlite.core import DType, GemLiteLinearTriton
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "gemlite": gemlite.__version__,
           "group": a.group, "matrices": {}, "errors": {}}
    g = torch.Generator(device="cuda").manual_seed(0)
    for name, (N, K) in MATS.items():
        try:
            w = torch.randn(N, K, generator=g, device="cuda") * 0.02
            q, s, z = quantize(w, 4, a.group)
            ref_w = dequantize(q, s, z)
            x = torch.randn(1, K, generator=g, device="cuda").to(torch.bfloat16)
            ref = x.float() @ ref_w.t()
            wb = ref_w.to(torch.bfloat16)
            tiny = QuantLinear(q, s, z, 4, kernel="int4cuda")
            gl = GemLiteLinearTriton(4, group_size=a.group, in_features=K, out_features=N,
                                     input_dtype=DType.BF16, output_dtype=DType.BF16)
            gl.pack(q.to(torch.uint8), s.to(torch.bfloat16), zeros=(8 - z / s).to(torch.bfloat16), fma_mode=True)
            t = time.perf_counter()
            y = gl(x).float()                                         # the first call autotunes
            row = {"shape": [N, K], "code_bytes": N * K // 2, "gemlite_first_call_s": time.perf_counter() - t,
                   "gemlite_rel_err": float((y - ref).abs().max() / ref.abs().max()),
                   "tinygemm_rel_err": float((tiny(x).float() - ref).abs().max() / ref.abs().max())}
            row["bf16_us"] = _graph_us(lambda: F.linear(x, wb), 20)
            row["tinygemm_us"] = _graph_us(lambda: tiny(x), 20)
            row["gemlite_us"] = _graph_us(lambda: gl(x), 20)
            row["gemlite_gb_s"] = row["code_bytes"] / row["gemlite_us"] / 1e3
            row["tinygemm_gb_s"] = row["code_bytes"] / row["tinygemm_us"] / 1e3
            res["matrices"][name] = row
            print(name, json.dumps(row), flush=True)
        except Exception as e:
            res["errors"][name] = f"{type(e).__name__}: {str(e)[:300]}"
            print(name, res["errors"][name], flush=True)
    m = res["matrices"]
    if len(m) == len(MATS):
        res["layer_us"] = {k: sum(r[f"{k}_us"] for r in m.values()) for k in ("bf16", "tinygemm", "gemlite")}
    res["elapsed_s"] = time.perf_counter() - t0
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "gemlite_probe.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "matrices"}, indent=1))


if __name__ == "__main__":
    main()
