"""afford: cheaper LLM decoding, with the cost in view."""
import os

# oneDNN's primitive cache and ideep's per-shape cache (behind torch's packed fp32 linear) keep up to 1,024
# entries each by default, one per matrix shape -- and a serving engine's row counts vary every step: in a
# soak the process grew ~1 MB per batch of requests (benchmarks/rss_probe.py). 128 entries each hold a
# decode's working set of shapes; both libraries read these when they first run, so set them before that
# (a user's own values win).
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "128")
os.environ.setdefault("LRU_CACHE_CAPACITY", "128")

from afford.config import ConfigError  # noqa: E402
from afford.core.outputs import RequestOutput  # noqa: E402
from afford.core.params import SamplingParams  # noqa: E402
from afford.llm import LLM  # noqa: E402

__all__ = ["LLM", "SamplingParams", "RequestOutput", "ConfigError"]
__version__ = "0.1.0"
