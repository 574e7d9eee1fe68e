"""How a one-row product's time grows with its matrix on a card (issue #13's int4 goal): bf16 against int4
over a range of shapes, to split each kernel's time into a fixed part and a streaming part.

For each (N, K): cuBLAS bf16 (F.linear), afford's bf16 one-row GEMV (triton_gemv.gemv, fastest of a few tiles),
torch's tinygemm int4 and afford's int4 GEMV (triton_gemv.gemv_w4, per-channel scales, fastest of a few
tiles), each timed as a chain of distinct matrices inside one CUDA graph (as the engine's captured step runs
them: launches excluded, enough matrices that none is still in L2 when its turn comes). No fusion (no add,
norm or SwiGLU), so every arm does the same work. Then per arm a least-squares fit over the K = 2048 family
(TinyLlama's K): time = fixed + bytes / rate -- the fixed part is what a matrix of this model cannot stream
away -- and the int4 / bf16 ratio per shape, for TinyLlama's four roles and Llama-3-8B's.
Usage: python benchmarks/gemv_scaling.py [--out DIR] [--tiny (a CPU smoke test under TRITON_INTERPRET=1)]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from afford.models import triton_gemv as tg  # noqa: E402
from afford.models.quant import QuantLinear, _graph_us, dequantize, quantize  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_decode import TINYLLAMA as TINYLLAMA_SHAPE  # noqa: E402
from gpu_decode import matrix_roles  # noqa: E402

FAMILY = [(512, 2048), (2048, 2048), (2560, 2048), (5632, 2048), (11264, 2048), (22528, 2048)]   # K = 2048
TINYLLAMA = {role: (N, K) for role, (N, K, _, _) in matrix_roles(TINYLLAMA_SHAPE).items()}
LLAMA8B = {role: (N, K) for role, (N, K, _, _) in matrix_roles(dict(
    hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336)).items()}
BF16_TILES = [(2, 2048, 4, 1), (4, 2048, 4, 1), (4, 1024, 4, 1), (8, 1024, 4, 1), (8, 512, 4, 3)]
W4_TILES = [(4, 2048, 4, 1), (8, 1024, 4, 1), (8, 1024, 4, 3), (16, 512, 4, 1), (4, 1024, 2, 1, 1), (4, 2048, 4, 1, 1),
            (4, 1024, 2, 1, 4), (8, 512, 2, 1, 4),         # halves with x in the codes' layout (X2D)
            (16, 256, 1, 1, 5), (16, 256, 1, 2, 5), (16, 512, 2, 1, 5), (32, 256, 1, 1, 5),   # quads (integer dot
            (8, 256, 1, 2, 5), (16, 1024, 4, 2, 5), (16, 256, 1, 2, 5, 4),
            (2, 2048, 8, 1, 1), (1, 2048, 4, 1, 1), (2, 2048, 4, 1, 1), (8, 2048, 4, 1, 5)]   # few weights a thread
# products, the last with K split over 4 programs; run 11's octets and tensor-core tiles, slower than the others on
# every shape, left this list)
# --maxnreg's probe: the int4 defaults' tiles (GEMV_W4_CONFIGS: q|k|v, o, gate|up, down) and run 12's other
# four-warp quads winner, timed again with their registers capped (157 / 128 / 128 / 118 a thread uncapped on
# sm_90: 1-4 programs an SM, so under PDL the next kernel's programs may find no room to start and prefetch)
MAXNREG_TILES = [(8, 2048, 4, 1), (16, 1024, 4, 2, 5), (16, 256, 1, 2, 5, 4), (4, 2048, 4, 1, 1), (16, 512, 2, 1, 5)]


def chain_us(fns, device: str) -> float:
    """Microseconds per call of the fns run one after another: one CUDA graph of them replayed (quant._graph_us;
    on the CPU, the wall clock of a plain loop)."""
    def run():
        for f in fns:
            f()
    if device == "cuda":
        return _graph_us(run, 1) / len(fns)
    run()
    t = time.perf_counter()
    run()
    return 1e6 * (time.perf_counter() - t) / len(fns)


def best_tile(tiles, call, ref, copies: int, device: str) -> dict:
    """The fastest tile of call(tile, i) (the product with matrix i) over the copies; a tile whose error passes
    5 % against ref (matrix 0's product) or that the card refuses is left out with its reason."""
    out = {"us": None, "tile": None, "errors": []}
    for t in tiles:
        try:
            err = float((call(t, 0).float() - ref).abs().max() / ref.abs().max())
            if not err <= 0.05:
                raise ValueError(f"relative error {err:.3g}")
            us = chain_us([lambda t=t, i=i: call(t, i) for i in range(copies)], device)
        except Exception as e:
            out["errors"].append(f"{t}: {type(e).__name__}: {str(e)[:100]}")
            continue
        out.setdefault("per_tile", []).append([list(t), us])
        if out["us"] is None or us < out["us"]:
            out["us"], out["tile"] = us, list(t)
    return out


def measure(N: int, K: int, device: str, copies_for: int, bf16_tiles: list, w4_tiles: list,
            maxnreg: tuple = ()) -> dict:
    gen = torch.Generator(device=device).manual_seed(N * 7 + K)
    copies = max(4, min(256, -(-copies_for // (N * K // 2))))      # int4 codes of all copies >= copies_for bytes
    ws = [torch.randn(N, K, generator=gen, device=device) * 0.02 for _ in range(copies)]
    x = torch.randn(1, K, generator=gen, device=device).to(torch.bfloat16)
    row = {"shape": [N, K], "copies": copies, "bf16_bytes": N * K * 2, "int4_bytes": N * K // 2}
    wb = [w.to(torch.bfloat16) for w in ws]
    qs = [quantize(w, 4, K) for w in ws]
    del ws
    ref_b = x.float() @ wb[0].float().t()
    ref_q = x.float() @ dequantize(*qs[0]).t()
    arms = {}
    try:
        arms["cublas_bf16"] = {"us": chain_us([lambda w=w: F.linear(x, w) for w in wb], device)}
    except Exception as e:
        arms["cublas_bf16"] = {"us": None, "errors": [f"{type(e).__name__}: {str(e)[:100]}"]}
    arms["afford_bf16"] = best_tile(bf16_tiles, lambda t, i: tg.gemv(x, wb[i], t)[0], ref_b, copies, device)
    wb.clear()                                   # free the card for the int4 copies
    try:
        qls = [QuantLinear(q, s, z, 4, kernel="int4cuda") for q, s, z in qs]
        arms["tinygemm_int4"] = {"us": chain_us([lambda m=m: m(x) for m in qls], device)}
        del qls
    except Exception as e:                        # the CPU: no tinygemm
        arms["tinygemm_int4"] = {"us": None, "errors": [f"{type(e).__name__}: {str(e)[:100]}"]}
    packed = {lay: [(tg.w4_pack(q, lay), s.contiguous(), z.contiguous()) for q, s, z in qs]
              for lay in sorted({tg.w4_kind(t)[0] for t in w4_tiles})}
    arms["afford_int4"] = best_tile(
        w4_tiles, lambda t, i: tg.gemv_w4(x, *packed[tg.w4_kind(t)[0]][i], K, t)[0], ref_q, copies, device)
    for cap in maxnreg:                           # the same kernels with their registers capped
        arms[f"afford_int4_r{cap}"] = best_tile(
            [t for t in MAXNREG_TILES if tg.w4_kind(t)[0] in packed],
            lambda t, i, cap=cap: tg.gemv_w4(x, *packed[tg.w4_kind(t)[0]][i], K, t, maxnreg=cap)[0], ref_q, copies,
            device)
    for name, arm in arms.items():
        nbytes = row["int4_bytes" if "int4" in name else "bf16_bytes"]
        arm["tb_s"] = nbytes / arm["us"] / 1e6 if arm["us"] else None
    row["arms"] = arms
    return row


def fit(points: list[tuple[float, float]]) -> dict | None:
    """Least squares of us = fixed + bytes / rate over (bytes, us) points: fixed us, rate TB/s."""
    pts = [(b, u) for b, u in points if u]
    if len(pts) < 2:
        return None
    n, sx, sy = len(pts), sum(b for b, _ in pts), sum(u for _, u in pts)
    sxx, sxy = sum(b * b for b, _ in pts), sum(b * u for b, u in pts)
    slope = (n * sxy - sx * sy) / (n * sxx - sx * sx)
    fixed = (sy - slope * sx) / n
    worst = max(abs(fixed + slope * b - u) / u for b, u in pts)
    return {"fixed_us": fixed, "rate_tb_s": 1 / slope / 1e6 if slope > 0 else None, "worst_rel_residual": worst}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--tiny", action="store_true", help="small shapes on the CPU (TRITON_INTERPRET=1): a smoke test")
    ap.add_argument("--shapes", help="NxK,NxK,...: time these instead (no fit or layer sums)")
    ap.add_argument("--w4-tiles", help="int4 tiles as BLOCK_N,BLOCK_K,warps,stages[,kind];... instead of W4_TILES")
    ap.add_argument("--bf16-tiles", help="bf16 tiles as BLOCK_N,BLOCK_K,warps,stages;... instead of BF16_TILES")
    ap.add_argument("--name", default="gemv_scaling", help="the result file's name (without .json)")
    ap.add_argument("--maxnreg", default="", help="registers a thread, comma-separated: MAXNREG_TILES again with each "
                    "cap (arms afford_int4_r<cap>, their own fits)")
    a = ap.parse_args()
    tiles = lambda spec: [tuple(int(v) for v in t.split(",")) for t in spec.split(";") if t.strip()]  # noqa: E731
    w4_tiles = tiles(a.w4_tiles) if a.w4_tiles else W4_TILES
    caps = tuple(int(c) for c in a.maxnreg.split(",") if c.strip())
    bf16_tiles = tiles(a.bf16_tiles) if a.bf16_tiles else BF16_TILES
    device = "cpu" if a.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("gemv_scaling.py times CUDA kernels: run it on a machine with an NVIDIA card (or --tiny on the CPU)")
    if a.tiny and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("--tiny runs afford's Triton kernels in Triton's interpreter: set TRITON_INTERPRET=1")
    family, llama8b, tinyllama = FAMILY, LLAMA8B, TINYLLAMA
    if a.tiny:
        family, llama8b, tinyllama = [(32, 64), (64, 64)], {"o": (32, 128)}, {"o": (64, 64)}
    t0 = time.time()
    res = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke test)",
           "torch": torch.__version__, "commit": os.environ.get("AFFORD_COMMIT"), "pdl": tg.pdl_args(
               torch.zeros(1, device=device)).get("PDL", False), "shapes": {}}
    copies_for = 1 << 12 if a.tiny else 200 << 20
    shapes = [tuple(int(v) for v in sh.split("x")) for sh in a.shapes.split(",")] if a.shapes else \
        list(dict.fromkeys(family + list(tinyllama.values()) + list(llama8b.values())))
    res["w4_tiles"], res["bf16_tiles"] = [list(t) for t in w4_tiles], [list(t) for t in bf16_tiles]
    for N, K in shapes:
        row = measure(N, K, device, copies_for, bf16_tiles, w4_tiles, caps)
        res["shapes"][f"{N}x{K}"] = row
        print(f"{N}x{K}", {k: (round(v['us'], 2) if v['us'] else None, v.get('tile')) for k, v in row["arms"].items()},
              "int4 tiles", [(tuple(t), round(us, 2)) for t, us in row["arms"]["afford_int4"].get("per_tile", [])],
              flush=True)
        torch.cuda.empty_cache() if device == "cuda" else None
    if a.shapes:                             # a tile probe: the shapes' rows alone
        write(res, a, t0)
        return
    arms = ["cublas_bf16", "afford_bf16", "tinygemm_int4", "afford_int4"] + [f"afford_int4_r{c}" for c in caps]
    res["fit_k2048"] = {arm: fit([(r["int4_bytes" if "int4" in arm else "bf16_bytes"], r["arms"][arm]["us"])
                                  for r in (res["shapes"][f"{N}x{K}"] for N, K in family)]) for arm in arms}
    per_tile = {}                            # each int4 tile's own fit: a kernel's fixed part and rate, not the best's
    for N, K in family:
        r = res["shapes"][f"{N}x{K}"]
        for arm, cap in [("afford_int4", "")] + [(f"afford_int4_r{c}", f" r{c}") for c in caps]:
            for t, us in r["arms"][arm].get("per_tile", []):
                per_tile.setdefault(str(tuple(t)) + cap, []).append((r["int4_bytes"], us))
    res["fit_k2048_int4_tiles"] = {t: fit(pts) for t, pts in per_tile.items()}

    def layer(roles):                        # one layer's four products: the faster of each kind's two kernels
        rows = [res["shapes"][f"{N}x{K}"]["arms"] for N, K in roles.values()]
        pick = [min((r[k]["us"] for k in ks if r[k]["us"]), default=None)
                for r in rows for ks in (("cublas_bf16", "afford_bf16"), ("tinygemm_int4", "afford_int4"))]
        bf16, int4 = pick[0::2], pick[1::2]
        if None in bf16 or None in int4:
            return None
        return {"bf16_us": sum(bf16), "int4_us": sum(int4), "int4_speedup": sum(bf16) / sum(int4)}
    res["layer"] = {"tinyllama": layer(tinyllama), "llama3_8b": layer(llama8b)}
    print(json.dumps({k: res[k] for k in ("fit_k2048", "layer")}, indent=1))
    write(res, a, t0)


def write(res: dict, a, t0: float):
    res["elapsed_s"] = time.time() - t0
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / f"{a.name}{'_tiny' if a.tiny else ''}.json").write_text(json.dumps(res, indent=1))
    print(f"elapsed {res['elapsed_s']:.0f} s")


if __name__ == "__main__":
    main()
