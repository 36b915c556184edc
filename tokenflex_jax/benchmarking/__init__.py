"""The benchmark's parts (`tokenflex_jax.bench` is the binary): timing and the host's
matmul roofline, the JAX train steps, the input pipeline, generation, the PyTorch peer,
and the report."""
