"""Accelerators for the Step-3 cost model (../shared/reference/step3.md §2.2). Pure arithmetic.

compute FLOPs = FP8 peak where the card has FP8, else BF16 (the paper's convention; INT8 weights and
KV have FP8's bytes on cards without FP8). Prices are USD per card-hour and can be overridden.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from afford.config import ConfigError


@dataclass(frozen=True)
class Hardware:
    key: str
    name: str
    price_per_hour: float
    bf16_flops: float
    fp8_flops: float | None
    mem_bw: float               # bytes / s
    net_gbps: float             # per 8-card server, the paper's network assumption
    source: str
    # measured FLOP/s of a weight product by the number of rows (tokens) it multiplies, ((rows, flops), ...):
    # a product of few rows runs below the peak on a CPU (and on a GPU below its tensor-core tile).
    # Empty: every product at `flops`.
    flops_by_rows: tuple[tuple[float, float], ...] = ()
    # measured bytes / s at which the attention kernel reads K/V (a decode attention kernel rarely reads at
    # the GEMV rate: strided per-head rows, softmax); None: mem_bw
    kv_bw: float | None = None
    net_latency_us: float = 0.0  # one-way latency of one message on the network (custom hardware: lat_us=)

    @property
    def kv_read_bw(self) -> float:
        return self.kv_bw or self.mem_bw

    @property
    def flops(self) -> float:
        return self.fp8_flops or self.bf16_flops

    def flops_at(self, rows: float) -> float:
        """FLOP/s of a product of `rows` rows: the calibration table interpolated linearly in log(rows),
        flat beyond its ends; the peak without a table."""
        t = self.flops_by_rows
        if not t:
            return self.flops
        if rows <= t[0][0]:
            return t[0][1]
        for (r0, f0), (r1, f1) in zip(t, t[1:]):
            if rows <= r1:
                w = (math.log(rows) - math.log(r0)) / (math.log(r1) - math.log(r0))
                return f0 + w * (f1 - f0)
        return t[-1][1]

    @property
    def usd_per_flop(self) -> float:
        return self.price_per_hour / (3600 * self.flops)

    @property
    def usd_per_byte(self) -> float:
        return self.price_per_hour / (3600 * self.mem_bw)

    @property
    def roofline(self) -> float:
        """FLOPs per byte where compute and memory time are equal."""
        return self.flops / self.mem_bw


HARDWARE: dict[str, Hardware] = {h.key: h for h in (
    # Step-3 TR Table 4 (prices, FLOPs, bandwidth) and §5.4 (8 x 400 / 8 x 200 Gbps per server)
    Hardware("h800", "NVIDIA H800", 2.0, 9.89e14, 1.98e15, 3.35e12, 3200, "Step-3 TR Table 4"),
    Hardware("h20", "NVIDIA H20", 0.8, 1.48e14, 2.96e14, 4.00e12, 3200, "Step-3 TR Table 4"),
    Hardware("a800", "NVIDIA A800", 0.75, 3.12e14, None, 2.00e12, 1600, "Step-3 TR Table 4"),
    Hardware("910b", "Huawei Ascend 910B", 0.67, 2.80e14, None, 1.60e12, 1600,
             "Step-3 TR Table 4 (price estimated from FLOPs vs A800)"),
    # Public dense (no sparsity) datasheet peaks. Prices are NOT from the paper: assumed on-demand cloud
    # prices per card-hour; set your own with --price KEY=USD.
    Hardware("h100", "NVIDIA H100 SXM", 2.5, 9.89e14, 1.979e15, 3.35e12, 3200,
             "NVIDIA H100 datasheet (SXM5: 989 TF BF16, 1979 TF FP8, 3.35 TB/s); price assumed"),
    Hardware("h200", "NVIDIA H200 SXM", 3.5, 9.89e14, 1.979e15, 4.8e12, 3200,
             "NVIDIA H200 datasheet (989 TF BF16, 1979 TF FP8, 4.8 TB/s); price assumed"),
    Hardware("a100", "NVIDIA A100 SXM 80GB", 1.3, 3.12e14, None, 2.039e12, 1600,
             "NVIDIA A100 datasheet (312 TF BF16, 2.039 TB/s); price assumed"),
    Hardware("l20", "NVIDIA L20", 0.5, 1.195e14, 2.39e14, 8.64e11, 800,
             "NVIDIA L20 spec (119.5 TF BF16, 239 TF FP8, 864 GB/s); 4 x 200 Gbps per server (Step-3 TR §6); price assumed"),
    Hardware("l4", "NVIDIA L4", 0.4, 1.21e14, 2.425e14, 3.0e11, 800,
             "NVIDIA L4 datasheet (121 TF BF16, 242.5 TF FP8, 300 GB/s); price assumed"),
)}


def custom_hardware(text: str) -> Hardware:
    """'KEY:flops=F,bw=B[,net=GBPS][,lat_us=US][,price=USD][,kv_bw=B_KV][,flops@R=F_R ...]' -- a machine you
    measured (FLOP/s, bytes/s of memory bandwidth, network Gbit/s and one-way microseconds per message, USD
    per hour, and optionally the bytes/s at which its attention kernel reads K/V and the FLOP/s of a product
    of R rows, a calibration table), e.g. `cpu:flops=4.1e10,bw=1.2e10,net=80,lat_us=50,kv_bw=7e9,flops@1=8e9`."""
    key, _, rest = text.partition(":")
    vals, by_rows = {}, {}
    for item in rest.split(","):
        k, _, v = item.partition("=")
        k = k.strip()
        try:
            if k.startswith("flops@"):
                by_rows[float(k[6:])] = float(v)
            else:
                vals[k] = float(v)
        except ValueError:
            raise ConfigError(f"--custom-hardware {text!r}: {item!r} is not NAME=NUMBER (or flops@ROWS=NUMBER)") from None
    unknown = set(vals) - {"flops", "bw", "net", "price", "kv_bw", "lat_us"}
    if not key.strip() or unknown or not {"flops", "bw"} <= set(vals) or vals.get("lat_us", 0) < 0 or \
            any(v <= 0 for k, v in vals.items() if k != "lat_us") or any(v <= 0 for v in [*by_rows, *by_rows.values()]):
        raise ConfigError(f"--custom-hardware takes KEY:flops=F,bw=B[,net=GBPS][,lat_us=US][,price=USD][,kv_bw=B]"
                          f"[,flops@ROWS=F ...] with positive numbers, got {text!r}")
    return Hardware(key.strip().lower(), f"custom {key.strip()}", vals.get("price", 1.0), vals["flops"], None,
                    vals["bw"], vals.get("net", 100.0), "measured by the user (--custom-hardware)",
                    tuple(sorted(by_rows.items())), vals.get("kv_bw"), vals.get("lat_us", 0.0))


def get_hardware(keys: str | list[str] | None = None, prices: dict[str, float] | None = None,
                 custom: list[Hardware] = ()) -> list[Hardware]:
    """Hardware by key (comma-separated or list; None: all), with optional price overrides; `custom` adds
    machines (custom_hardware) that the keys may name."""
    known = {**HARDWARE, **{h.key: h for h in custom}}
    if keys is None:
        names = list(known)
    else:
        names = [k.strip().lower() for k in (keys.split(",") if isinstance(keys, str) else keys) if k.strip()]
        if not names:
            raise ConfigError(f"no hardware named; give keys such as h100,h800 (known: {', '.join(HARDWARE)})")
    unknown = [k for k in names if k not in known]
    if unknown:
        raise ConfigError(f"unknown hardware {', '.join(unknown)}; known: {', '.join(known)}")
    prices = prices or {}
    bad = [k for k in prices if k not in known]
    if bad:
        raise ConfigError(f"--price names unknown hardware {', '.join(bad)}; known: {', '.join(known)}")
    return [replace(known[k], price_per_hour=prices.get(k, known[k].price_per_hour)) for k in names]
