"""Accuracy evaluation on real models: perplexity, retrieval, agreement, acceptance, recovery."""
