"""posttrain: one command-line pipeline for LLM post-training on top of Hugging Face TRL."""

__version__ = "0.1.0"
