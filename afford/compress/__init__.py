"""`afford compress`: lossless compression with exact probability models -- a language model for bytes
(text.py), a probabilistic circuit for small images (circuit.py) -- entropy-coded by coder.py.

The text coder's defaults, shared by the library and the CLI (benchmarks/compress.py measures them):"""
CONTEXT = 256       # positions per window, BOS included: the length the bundled models trained on
BATCH = 16          # lanes decoded together
OVERLAP = 64        # preceding tokens each window re-reads, so no token is coded from a cold start
