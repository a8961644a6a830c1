"""hybrid: experiment with hybrid state-space / attention language models.

    >>> import hybrid
    >>> model = hybrid.build_model("MMMA", d_model=64, vocab_size=256)
    >>> hybrid.parse_pattern("MMMWx2").canonical
    'MMMWx2'
"""

from hybrid.model import HybridLM, ModelConfig, build_model
from hybrid.pattern import parse_pattern
from hybrid.registry import ConfigError, list_layers

__all__ = ["ConfigError", "HybridLM", "ModelConfig", "build_model", "list_layers", "parse_pattern"]
__version__ = "0.1.0"
