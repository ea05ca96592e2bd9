"""lota: lottery-ticket sparse adaptation of Hugging Face causal language models."""

__version__ = "0.1.0"
