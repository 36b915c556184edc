r"""The profile's isolated measurements: the decoder's SwiGLU matmul alone and two side by
side, causal attention alone (reference and causal blocks), and the train step with each
attention in alternating rounds (`tokenflex_jax.benchmarking.micro`).

  python -m tokenflex_jax.microbench --config=configs/bench.py --workdir=/tmp/micro \
      [--num_tokens=256]

Prints markdown lines; docs/performance.md quotes them.
"""

from __future__ import annotations

from absl import flags

from tokenflex_jax.app import cli, config_checks, config_schema
from tokenflex_jax.benchmarking import micro


def run(config: config_schema.ConfigDict, workdir: str, num_tokens: int) -> str:
  """The binary's job: `micro.main_report`, printed."""
  spec = config_schema.to_spec(config)
  config_checks.check(spec, config_checks.TRAIN)  # Before the workdir is written or compiles.
  text = micro.main_report(spec, workdir, num_tokens)
  print(text)
  return text


def main() -> None:
  num_tokens = flags.DEFINE_integer("num_tokens", 256, "The bucket (visual tokens) measured.")
  cli.run(lambda config, workdir: run(config, workdir, num_tokens.value))


if __name__ == "__main__":
  main()
