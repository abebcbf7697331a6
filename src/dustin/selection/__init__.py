"""Which KV entries a pass reads: importance signals and selection policies."""
from .indices import streaming_indices

__all__ = ["streaming_indices"]
