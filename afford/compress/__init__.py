"""`afford compress`: lossless compression with exact probability models -- a language model for bytes
(text.py), a probabilistic circuit for small images (circuit.py) -- entropy-coded by coder.py."""
