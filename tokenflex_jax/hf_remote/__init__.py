"""The Python files an exported Hugging Face folder ships (``trust_remote_code``).

`tokenflex_jax.app.hf_export` copies them beside the weights; transformers imports them
from there, so they import only torch, transformers and each other (relative imports),
never this package. Nothing in the package imports them.
"""
