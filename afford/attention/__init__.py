"""Attention backends behind one interface (backend.py); `get_backend(name)` builds one by name."""
from afford.attention.backend import BACKENDS, AttentionBackend, AttnMetadata, ForwardBatch
from afford.attention.paged import PagedBackend
from afford.attention.paged_cpu import PagedCPUBackend
from afford.attention.sdpa import GatherSDPABackend
from afford.attention.sparse import SparseBackend
from afford.config import ConfigError

__all__ = ["AttentionBackend", "AttnMetadata", "ForwardBatch", "GatherSDPABackend", "PagedBackend", "PagedCPUBackend",
           "SparseBackend", "get_backend"]


def get_backend(name: str, **options) -> AttentionBackend:
    """The backend `name`, built with its options (the sparse backend's budget, locality ...)."""
    if name not in BACKENDS:
        raise ConfigError(f"unknown attention backend {name!r}; known: {', '.join(sorted(BACKENDS))}")
    try:
        return BACKENDS[name](**options)
    except ValueError as e:
        raise ConfigError(str(e)) from None
