"""sparsetrain: weight-sparse pre-training of GPT-style language models, then dense fine-tuning."""

__version__ = "0.1.0"
