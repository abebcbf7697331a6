"""Which KV entries a pass reads: importance signals and selection policies."""
from .indices import budget_split, streaming_indices
from .policies import Dustin, Oracle, Policy, Quest, SnapKV, Streaming, make_policy

__all__ = ["Dustin", "Oracle", "Policy", "Quest", "SnapKV", "Streaming", "budget_split", "make_policy",
           "streaming_indices"]
