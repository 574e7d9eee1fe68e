"""What bounds `afford compress` on a text: the bundled target's cross-entropy (bits per byte) scored
teacher-forced in 256-position windows, from cold chunks (each window starts at BOS with no context) and
with every scored token seeing at least 256 - 1 - stride tokens of the text before it, and in 512-position
windows (beyond the 256 it trained on). The coder spends the model's cross-entropy (benchmarks/compress.py),
so this is the smallest file any window layout can give.

    python benchmarks/compress_bound.py           # -> results/compress_bound.json (about 1 minute)
"""
from __future__ import annotations

import lzma
import sys

import numpy as np
import torch
from common import ROOT, save

sys.path.insert(0, str(ROOT))
from afford.compress.bench import text_corpora  # noqa: E402
from afford.compress.text import ByteTokens  # noqa: E402
from afford.models.loader import load_model, load_tokenizer, resolve_model_path  # noqa: E402


@torch.inference_mode()
def bits_per_byte(model, ids: list[int], n_bytes: int, bos: int, window: int, stride: int) -> float:
    """Sum of -log2 p over every token, each scored once, in windows of `window` positions (BOS first) that
    advance by `stride` scored tokens and fill the rest with the preceding text."""
    t = torch.tensor(ids)
    total = 0.0
    for s in range(0, len(ids), stride):
        lo = max(0, s - (window - 1 - stride))
        x = torch.cat([torch.tensor([bos]), t[lo:s + stride]])[None]              # (1, T)
        logp = model(x)[0, :-1].float().log_softmax(-1)                            # (T - 1, V)
        y = x[0, 1:]
        nll = -logp[torch.arange(len(y)), y] / np.log(2)
        total += float(nll[s - lo:].sum())
    return total / n_bytes


def main() -> None:
    path = resolve_model_path("default")
    tok = ByteTokens(load_tokenizer(path))
    model = load_model(path, "cpu", "float32", 1024)
    bos = tok.tokenizer.bos_token_id
    rows = []
    for name, data in text_corpora(ROOT / "data").items():
        ids = tok.encode(data)
        xz = 8 * len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)) / len(data)
        for window, stride in ((256, 255), (256, 128), (256, 64), (256, 32), (512, 511)):
            bpb = bits_per_byte(model, ids, len(data), bos, window, stride)
            rows.append({"file": name, "window": window, "stride": stride, "min_context": window - 1 - stride,
                         "bits_per_byte": bpb, "xz_bits_per_byte": xz, "x_smaller_than_xz_at_best": xz / bpb})
            print(f"{name} window {window} stride {stride}: {bpb:.3f} bits/byte (xz {xz:.3f}: {xz / bpb:.2f}x)",
                  flush=True)
    print(save("compress_bound", {"command": "python benchmarks/compress_bound.py", "rows": rows}))


if __name__ == "__main__":
    main()
