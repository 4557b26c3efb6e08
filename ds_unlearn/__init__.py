"""ds_unlearn: measure, unlearn and study memorized sequences in causal language models."""

from .memorization import MEMORIZED_MA, OVER_UNLEARNED_MA
from .scorer import score_sequences

__version__ = "0.1.0"
__all__ = ["score_sequences", "MEMORIZED_MA", "OVER_UNLEARNED_MA", "__version__"]
