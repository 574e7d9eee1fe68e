"""A language model as a lossless compressor: every token of the input is coded against the model's
next-token distribution, so decompressing is decoding -- one forward per token, with the token the range
decoder reads in place of a sampled one.

Exactness: the decoder must see the very logits the encoder saw. Both ends therefore run one loop,
`LMCodec._steps`, through the engine's runner (paged KV, the native CPU forward, CUDA graphs on a GPU): the
input's tokens are split into up to `batch` contiguous lanes that advance together, one token per lane per
forward; each lane is coded in windows of at most `context` positions that start from the BOS token and
(`overlap` > 0) re-read the lane's preceding tokens as context, so only a lane's first window starts cold. The
encoder feeds the known tokens through the same forwards the decoder will run -- not one prefill of the
whole input, whose different matrix shapes round differently -- so every forward has the same rows,
positions and kernels on both sides. The same software on the same kind of machine then gives the same bits;
the header's model hash and the original's SHA-256 turn any difference into an error, never into wrong bytes.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from afford.compress import BATCH, CONTEXT, OVERLAP, coder
from afford.compress.container import CorruptFile, model_identity, pack, sha256, unpack
from afford.config import ConfigError
from afford.core.runner import ModelRunner
from afford.kv.paged import BlockPool
from afford.models.loader import load_for_inference, load_tokenizer, resolve_model_path

TINY = torch.finfo(torch.float64).tiny                # a probability that underflowed still counts finite bits
_INVALID = re.compile("[\udc80-\udcff]+")           # bytes that are not UTF-8, after surrogateescape


def _byte_level_chars() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    return {c: b for b, c in bytes_to_unicode().items()}


class ByteTokens:
    """Any bytes <-> token ids of a tokenizer whose tokens spell bytes (byte-level BPE; SentencePiece with
    byte fallback): valid UTF-8 runs go through the tokenizer, every other byte is its single-byte token,
    and a run whose tokens do not spell it back exactly is coded byte by byte -- so every input round-trips."""

    def __init__(self, tokenizer, vocab_size: int = 0):
        """vocab_size: the model's; ids past the tokenizer's vocabulary (padded embeddings) spell nothing, so a
        decoder that reads one has gone wrong and the original's hash says so."""
        self.tokenizer = tokenizer
        inv = _byte_level_chars()
        vocab = tokenizer.get_vocab()
        special = set(tokenizer.all_special_tokens) | set(getattr(tokenizer, "added_tokens_encoder", {}))
        table: list[bytes] = [b""] * max(max(vocab.values()) + 1, vocab_size)
        for tok, i in vocab.items():
            if tok in special:
                table[i] = tok.encode()
            elif m := re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", tok):             # SentencePiece byte fallback
                table[i] = bytes([int(m.group(1), 16)])
            elif all(c in inv for c in tok):                                   # byte-level BPE
                table[i] = bytes(inv[c] for c in tok)
            else:
                table[i] = tok.replace("\u2581", " ").encode()
        self.table = table
        single = {}
        for i, b in enumerate(table):
            if len(b) == 1 and i not in tokenizer.all_special_ids:
                single.setdefault(b[0], i)
        missing = [b for b in range(256) if b not in single]
        if missing:
            raise ConfigError(f"this tokenizer has no token for {len(missing)} of the 256 byte values (e.g. "
                              f"{missing[0]:#04x}), so it cannot code arbitrary bytes; use a byte-level BPE "
                              f"tokenizer (every `afford zoo` model has one) or one with byte fallback")
        self.byte_id = [single[b] for b in range(256)]

    def encode(self, data: bytes) -> list[int]:
        text = data.decode("utf-8", errors="surrogateescape")
        ids: list[int] = []
        at = 0
        for m in [*_INVALID.finditer(text), None]:
            run = text[at:m.start() if m else len(text)]
            if run:
                raw = run.encode("utf-8")
                toks = self.tokenizer(run, add_special_tokens=False)["input_ids"]
                ids.extend(toks if self.decode(toks) == raw else (self.byte_id[b] for b in raw))
            if m:
                ids.extend(self.byte_id[b] for b in m.group().encode("utf-8", errors="surrogateescape"))
                at = m.end()
        return ids

    def decode(self, ids) -> bytes:
        return b"".join(self.table[i] for i in ids)


@dataclass
class CodecStats:
    bytes: int = 0
    tokens: int = 0
    forwards: int = 0
    seconds: float = 0.0
    payload_bits: int = 0
    model_bits: float = 0.0          # the model's own cross-entropy of the input (encode only)
    quantized_bits: float = 0.0      # -log2 of afford's integer frequencies (constriction maps them onto its own grid)

    @property
    def bits_per_byte(self) -> float:
        return self.payload_bits / max(self.bytes, 1)

    @property
    def bytes_per_second(self) -> float:
        return self.bytes / max(self.seconds, 1e-9)


class LMCodec:
    """context: positions per window, BOS included; overlap: tokens of the lane's preceding text each window
    re-reads as its context (0: independent chunks); batch: lanes decoded together."""

    def __init__(self, model: str | Path = "default", context: int = CONTEXT, batch: int = BATCH, overlap: int = OVERLAP,
                 device: str = "auto", dtype: str = "auto"):
        if context < 2 or batch < 1 or not 0 <= overlap < context - 1:
            raise ConfigError(f"need context >= 2, batch >= 1 and 0 <= overlap < context - 1 (got context={context}, "
                              f"batch={batch}, overlap={overlap})")
        self.path = resolve_model_path(model)
        self.model = load_for_inference(self.path, device, dtype, max_len=context)
        cfg = self.model.cfg
        if context > cfg.max_position_embeddings:
            raise ConfigError(f"context {context} exceeds the model's {cfg.max_position_embeddings} positions")
        self.tokens = ByteTokens(load_tokenizer(self.path), cfg.vocab_size)
        self.context, self.batch, self.overlap = context, batch, overlap
        bos = self.tokens.tokenizer.bos_token_id
        self.bos = bos if bos is not None else self.tokens.tokenizer.eos_token_id
        if self.bos is None:
            raise ConfigError("the tokenizer has neither a BOS nor an EOS token to start each window from")
        p = next(self.model.parameters())
        if p.dtype not in (torch.float32, torch.bfloat16, torch.float16) or p.device.type not in ("cpu", "cuda", "mps"):
            raise ConfigError(f"afford compress runs float32/bfloat16/float16 models on cpu, cuda or mps, "
                              f"not {p.dtype} on {p.device.type}")
        block = 16
        self.pool = BlockPool(batch * -(-context // block), block)
        self.runner = ModelRunner(self.model, self.pool, max_batch=batch)
        self.identity = model_identity(self.path)[:32]                 # 128 bits name the model
        self.stats = CodecStats()

    def settings(self) -> dict:
        p = next(self.model.parameters())
        return {"model": self.identity, "context": self.context, "batch": self.batch, "overlap": self.overlap,
                "dtype": str(p.dtype).replace("torch.", ""), "device": p.device.type,
                "precision": coder.PRECISION, "bos": self.bos}

    def lanes(self, n_tokens: int) -> list[list[tuple[int, int, int]]]:
        """The input's tokens cut into up to `batch` contiguous lanes of equal length, each lane into windows
        (context_start, start, end): a window codes tokens [start, end) after BOS and the lane's own tokens
        [context_start, start), at most `overlap` of them."""
        stride = self.context - 1 - self.overlap
        n_lanes = min(self.batch, -(-n_tokens // stride))
        out = []
        for j in range(n_lanes):
            lo, hi = j * n_tokens // n_lanes, (j + 1) * n_tokens // n_lanes
            out.append([(max(lo, s - self.overlap), s, min(s + stride, hi)) for s in range(lo, hi, stride)])
        return out

    def _steps(self, ids: list[int], step) -> None:
        """The loop both ends run. Each forward advances every lane by one token: a lane at the start of a window
        feeds BOS and the window's context (a prefill row), any other lane the token it coded last. step(positions,
        logits) returns the token at each active lane's position (the encoder: the known one; the decoder: the one
        the coder reads), written into ids."""
        lanes = self.lanes(len(ids))
        try:
            self._run_lanes(lanes, ids, step)
        finally:                                                  # an interrupted run leaves the pool empty too
            for lane in range(len(lanes)):
                self.pool.free(lane)

    def _run_lanes(self, lanes, ids, step) -> None:
        cur = [0] * len(lanes)                                    # each lane's current window
        pos = [w[0][1] for w in lanes]                            # each lane's next token to code
        active = list(range(len(lanes)))
        pool = self.pool
        while active:
            starts, feeds = [], []
            for lane in active:
                cs, s, _ = lanes[lane][cur[lane]]
                if pos[lane] == s:                                # a new window: BOS + its context
                    starts.append(0)
                    feeds.append([self.bos, *ids[cs:s]])
                else:
                    starts.append(pos[lane] - cs)                 # BOS at 0, token cs at 1, ...
                    feeds.append([ids[pos[lane] - 1]])
                pool.prepare_write(lane, starts[-1] + len(feeds[-1]))
            logits = self.runner.forward(active, starts, feeds)                      # (lanes, V) float32
            self.stats.forwards += 1
            for lane, t in zip(active, step([pos[lane] for lane in active], logits)):
                ids[pos[lane]] = t
                pos[lane] += 1
                if pos[lane] == lanes[lane][cur[lane]][2]:        # the window is done: its KV goes
                    pool.free(lane)
                    cur[lane] += 1
            active = [lane for lane in active if cur[lane] < len(lanes[lane])]

    def compress(self, data: bytes) -> bytes:
        t0 = time.perf_counter()
        ids = self.tokens.encode(data)
        if self.tokens.decode(ids) != data:                           # ByteTokens guarantees it; a cheap guard
            raise RuntimeError("internal error: the byte tokenization does not round-trip")
        enc = coder.Encoder()
        st = self.stats = CodecStats(bytes=len(data), tokens=len(ids))

        def step(positions, logits):
            toks = [ids[p] for p in positions]
            probs = coder.probabilities(logits)                   # the decoder's frequencies(logits), in two steps
            freqs = coder.quantize(probs)
            enc.encode(toks, freqs)
            st.model_bits -= float(probs[torch.arange(len(toks)), toks].clamp_min(TINY).log2().sum())
            st.quantized_bits += coder.ideal_bits(freqs, toks)
            return toks

        self._steps(list(ids), step)
        words = enc.words() if ids else np.zeros(0, dtype=np.uint32)
        header = {**self.settings(), "tokens": len(ids), "bytes": len(data), "sha256": sha256(data),
                  "torch": torch.__version__, "threads": torch.get_num_threads()}
        st.payload_bits = 32 * len(words)
        st.seconds = time.perf_counter() - t0
        return pack(header, words)

    def decompress(self, blob: bytes, name: str = "input") -> bytes:
        t0 = time.perf_counter()
        header, words = unpack(blob, name)
        self.stats = CodecStats()
        mine = self.settings()
        for key in ("model", "context", "batch", "overlap", "dtype", "device", "precision", "bos"):
            if header.get(key) != mine[key]:
                what = ("a different model" if key == "model" else f"{key}={header.get(key)!r} (this run has "
                        f"{mine[key]!r})")
                raise CorruptFile(f"{name} was compressed with {what}; decompress it with the same model and "
                                  f"settings (`afford decompress --model PATH`; context, batch and overlap are read "
                                  f"from the file when the CLI opens it)")
        dec = coder.Decoder(words)
        ids = [0] * header["tokens"]
        self._steps(ids, lambda positions, logits: dec.decode(coder.frequencies(logits)))
        data = self.tokens.decode(ids)
        self.stats = CodecStats(bytes=len(data), tokens=len(ids), forwards=self.stats.forwards,
                                payload_bits=32 * len(words), seconds=time.perf_counter() - t0)
        if len(data) != header["bytes"] or sha256(data) != header["sha256"]:
            raise CorruptFile(f"{name} did not decode to its original (hash mismatch): it was compressed with "
                              f"torch {header.get('torch')} on {header.get('threads')} threads and this run has "
                              f"torch {torch.__version__} on {torch.get_num_threads()}; the model's arithmetic must "
                              f"match bit for bit -- decompress on the machine and software that compressed it")
        return data
