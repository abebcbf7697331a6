"""dustin: long-context batched speculative decoding with draft-augmented sparse verification."""
from .cache import KVCache, estimate_memory
from .config import ModelArgs
from .errors import DustinError
from .loading import load_args, load_model, load_tokenizer
from .model import QueryCapture, Transformer
from .shapes import SHAPES

__all__ = [
    "DustinError", "KVCache", "ModelArgs", "QueryCapture", "SHAPES", "Transformer",
    "estimate_memory", "load_args", "load_model", "load_tokenizer",
]
__version__ = "0.1.0"
