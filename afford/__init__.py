"""afford: cheaper LLM decoding, with the cost in view."""
from afford.config import ConfigError
from afford.core.outputs import RequestOutput
from afford.core.params import SamplingParams
from afford.llm import LLM

__all__ = ["LLM", "SamplingParams", "RequestOutput", "ConfigError"]
__version__ = "0.1.0"
