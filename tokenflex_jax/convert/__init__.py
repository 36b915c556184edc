"""Converters between Hugging Face checkpoints and this project's parameters."""
