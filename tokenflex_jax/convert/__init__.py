"""The convert binary (`python -m tokenflex_jax.convert`): Hugging Face towers in, a
trained VLM out; the layouts themselves are `models.hf`."""
