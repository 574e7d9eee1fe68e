"""A language model as a lossless compressor: every token of the input is coded against the model's
next-token distribution, so decompressing is decoding -- one forward per token, with the token the range
decoder reads in place of a sampled one.

Exactness: the decoder must see the very logits the encoder saw. Both ends therefore run one loop,
`LMCodec._steps`, through the engine's runner (paged KV, the native CPU forward, CUDA graphs on a GPU): the
input is cut into chunks of at most `context` - 1 tokens, each chunk starts from the BOS token, and up to
`batch` chunks advance one token per forward as a continuous batch (a finished chunk's slot goes to the next
chunk). The encoder feeds the known tokens through the same decode-shaped forwards the decoder will run --
not one prefill, whose different matrix shapes round differently -- so every forward has the same batch,
positions and kernels on both sides. The same software on the same kind of machine then gives the same bits;
the header's model hash and the original's SHA-256 turn any difference into an error, never into wrong bytes.
"""
from __future__ import annotations

import re
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from afford.compress import coder
from afford.compress.container import CorruptFile, model_identity, pack, sha256, unpack
from afford.config import ConfigError
from afford.core.runner import ModelRunner
from afford.kv.paged import BlockPool
from afford.models.loader import load_for_inference, load_tokenizer, resolve_model_path

_INVALID = re.compile("[\udc80-\udcff]+")           # bytes that are not UTF-8, after surrogateescape


def _byte_level_chars() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    return {c: b for b, c in bytes_to_unicode().items()}


class ByteTokens:
    """Any bytes <-> token ids of a tokenizer whose tokens spell bytes (byte-level BPE; SentencePiece with
    byte fallback): valid UTF-8 runs go through the tokenizer, every other byte is its single-byte token,
    and a run whose tokens do not spell it back exactly is coded byte by byte -- so every input round-trips."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        inv = _byte_level_chars()
        vocab = tokenizer.get_vocab()
        special = set(tokenizer.all_special_tokens) | set(getattr(tokenizer, "added_tokens_encoder", {}))
        table: list[bytes] = [b""] * (max(vocab.values()) + 1)
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
    quantized_bits: float = 0.0      # -log2 of the integer frequencies the coder used (encode only)
    extra: dict = field(default_factory=dict)

    @property
    def bits_per_byte(self) -> float:
        return self.payload_bits / max(self.bytes, 1)

    @property
    def bytes_per_second(self) -> float:
        return self.bytes / max(self.seconds, 1e-9)


class LMCodec:
    def __init__(self, model: str | Path = "default", context: int = 256, batch: int = 16, device: str = "auto",
                 dtype: str = "auto"):
        if context < 2 or batch < 1:
            raise ConfigError(f"context must be >= 2 and batch >= 1 (got {context}, {batch})")
        self.path = resolve_model_path(model)
        self.tokens = ByteTokens(load_tokenizer(self.path))
        self.model = load_for_inference(self.path, device, dtype, max_len=context)
        if context > self.model.max_len:
            raise ConfigError(f"context {context} exceeds the model's {self.model.max_len} positions")
        self.context, self.batch = context, batch
        bos = self.tokens.tokenizer.bos_token_id
        self.bos = bos if bos is not None else self.tokens.tokenizer.eos_token_id
        if self.bos is None:
            raise ConfigError("the tokenizer has neither a BOS nor an EOS token to start each chunk from")
        block = 16
        self.pool = BlockPool(batch * -(-context // block), block)
        self.runner = ModelRunner(self.model, self.pool, max_batch=batch)
        self.identity = model_identity(self.path)[:32]                 # 128 bits name the model
        self.stats = CodecStats()

    def settings(self) -> dict:
        p = next(self.model.parameters())
        return {"model": self.identity, "context": self.context, "batch": self.batch,
                "dtype": str(p.dtype).replace("torch.", ""), "device": p.device.type,
                "precision": coder.PRECISION, "bos": self.bos}

    def chunk_lengths(self, n_tokens: int) -> list[int]:
        per = self.context - 1
        return [min(per, n_tokens - s) for s in range(0, n_tokens, per)]

    def _steps(self, lengths: list[int], step) -> None:
        """The loop both ends run. Chunk c feeds BOS and then its own tokens at positions 0..lengths[c]-1;
        each forward advances every active chunk by one token. step(active, positions, logits) returns the
        token each active chunk takes next (the encoder: the known one; the decoder: the one the coder reads)."""
        pending, active = deque(range(len(lengths))), []
        pos, last = {}, {}
        pool = self.pool
        while pending or active:
            while pending and len(active) < self.batch:                  # a finished chunk's slot is refilled
                c = pending.popleft()
                active.append(c)
                pos[c], last[c] = 0, self.bos
            for c in active:
                pool.prepare_write(c, pos[c] + 1)
            at = [pos[c] for c in active]
            logits = self.runner.forward(active, at, [[last[c]] for c in active])              # (B, V) float32
            self.stats.forwards += 1
            for c, t in zip(active, step(active, at, logits)):
                last[c] = t
                pos[c] += 1
            for c in [c for c in active if pos[c] == lengths[c]]:
                pool.free(c)
            active = [c for c in active if pos[c] < lengths[c]]

    def compress(self, data: bytes) -> bytes:
        t0 = time.perf_counter()
        ids = self.tokens.encode(data)
        if self.tokens.decode(ids) != data:                           # ByteTokens guarantees it; a cheap guard
            raise RuntimeError("internal error: the byte tokenization does not round-trip")
        lengths = self.chunk_lengths(len(ids))
        per = self.context - 1
        enc = coder.Encoder()
        st = self.stats = CodecStats(bytes=len(data), tokens=len(ids))

        def step(active, at, logits):
            toks = [ids[c * per + p] for c, p in zip(active, at)]
            freqs = coder.frequencies(logits)
            enc.encode(toks, freqs)
            rows = torch.arange(len(toks))
            st.model_bits -= float(logits.double().log_softmax(-1)[rows, toks].sum()) / np.log(2)
            st.quantized_bits += coder.ideal_bits(freqs, toks)
            return toks

        self._steps(lengths, step)
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
        for key in ("model", "context", "batch", "dtype", "device", "precision", "bos"):
            if header.get(key) != mine[key]:
                what = ("a different model" if key == "model" else f"{key}={header.get(key)!r} (this run has "
                        f"{mine[key]!r})")
                raise CorruptFile(f"{name} was compressed with {what}; decompress it with the same model and "
                                  f"settings (`afford decompress --model PATH`; context and batch are read from "
                                  f"the file when the CLI opens it)")
        n = header["tokens"]
        dec = coder.Decoder(words)
        out: dict[int, list[int]] = {}

        def step(active, at, logits):
            toks = dec.decode(coder.frequencies(logits))
            for c, t in zip(active, toks):
                out.setdefault(c, []).append(t)
            return toks

        lengths = self.chunk_lengths(n)
        self._steps(lengths, step)
        data = self.tokens.decode(t for c in range(len(lengths)) for t in out[c])
        self.stats = CodecStats(bytes=len(data), tokens=n, forwards=self.stats.forwards,
                                payload_bits=32 * len(words), seconds=time.perf_counter() - t0)
        if len(data) != header["bytes"] or sha256(data) != header["sha256"]:
            raise CorruptFile(f"{name} did not decode to its original (SHA-256 mismatch): it was compressed with "
                              f"torch {header.get('torch')} on {header.get('threads')} threads and this run has "
                              f"torch {torch.__version__} on {torch.get_num_threads()}; the model's arithmetic must "
                              f"match bit for bit -- decompress on the machine and software that compressed it")
        return data
