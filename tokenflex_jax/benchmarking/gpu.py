"""The prepared GPU check: every GPU figure the project needs, in one process.

`tokenflex_jax.gpu_check` is its binary and ``launch/gpu_check.sh`` its one command (on
a lent GPU machine, or ``--dry`` on a CPU at tiny shapes: the same code path). Sections,
each recorded as it finishes (a failure is recorded and the next one runs):
1. ``versions``: Python, the packages, the backend and device, CUDA and cuDNN;
2. ``matmul``: the device's measured bfloat16 matmul rate (`timing.roofline_gflops`);
3. ``attention``: the decoder's causal attention (`layers.causal_self_attention`) per
   implementation against `layers.reference_attention` in float32, values and gradients,
   right padding (the mask as structure) and left padding (the dense mask), each
   implementation's forward + backward time, and whether its compiled program calls the
   cuDNN kernel;
4. ``bench``: `suite.benchmark` on the config (configs/gpu_bench.py): per bucket the
   median step, MFU against the measured rate and the chip's published peak, memory,
   compile time; the mix against the largest bucket; KV-cache decoding; the PyTorch
   peer on the same device (the binary reruns it with XLA's attention, ``bench_xla``,
   if it fails).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tokenflex_jax.benchmarking import timing
from tokenflex_jax.models import layers

# Dense bfloat16 FLOP/s and memory bandwidth (bytes/s) by the vendor's datasheets
# (NVIDIA H100/H200 SXM: 1,979 TFLOP/s bf16 with 2:4 sparsity, half that dense; HBM3
# 3.35 TB/s, HBM3e 4.8 TB/s), keyed by a word of JAX's device_kind.
GPU_SPECS: dict[str, tuple[float, float]] = {
    "H200": (989.4e12, 4.8e12),
    "H100": (989.4e12, 3.35e12),
}

PACKAGES = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax",
            "orbax-checkpoint", "grain", "ml_collections", "numpy", "torch", "transformers")


@dataclasses.dataclass(frozen=True)
class AttentionShape:
  """q [batch, length, heads, head_dim]; k, v [batch, length, kv_heads, head_dim]."""
  batch: int
  length: int
  heads: int
  kv_heads: int
  head_dim: int


# The 1b config's decoder at its longest bucket (1,024 text + 256 visual positions).
FULL_ATTENTION = AttentionShape(4, 1280, 12, 2, 128)
DRY_ATTENTION = AttentionShape(2, 64, 4, 2, 32)

# bfloat16 against float32: a relative error (max |got - want| / max |want|) under these.
VALUE_TOLERANCE = 2e-2
GRAD_TOLERANCE = 5e-2


def spec_of(device_kind: str) -> tuple[float, float] | None:
  """The published (bf16 FLOP/s, bytes/s) of a GPU by its JAX device_kind, or None."""
  return next((v for k, v in GPU_SPECS.items() if k in device_kind), None)


def versions() -> dict[str, Any]:
  """What the check runs with: Python, package versions (None: not installed), JAX's
  backend and device, and torch's CUDA and cuDNN where torch has them."""
  out: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform()}
  for name in PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  out.update(backend=jax.default_backend(), device_kind=jax.devices()[0].device_kind,
             device_count=jax.device_count())
  try:
    import torch  # pylint: disable=import-outside-toplevel  (optional here)
    out["torch_cuda"] = torch.version.cuda
    out["torch_cudnn"] = torch.backends.cudnn.version() if torch.cuda.is_available() else None
  except ImportError:
    pass
  return out


def attention_implementations() -> tuple[str, ...]:
  """The jax.nn.dot_product_attention implementations this backend has."""
  return ("cudnn", "xla") if jax.default_backend() == "gpu" else ("xla",)


def _relative_error(got: jax.Array, want: jax.Array) -> float:
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))


def attention_check(shape: AttentionShape, calls: int) -> dict[str, Any]:
  """Each implementation (and the reference) against the float32 reference: relative
  error of the output and of the q, k, v gradients on the query rows that have a valid
  key, right padding (keys a prefix: `causal_self_attention` passes the mask as
  structure) and left padding (the dense mask); forward + backward milliseconds at right
  padding; whether the compiled program calls cuDNN's fused attention."""
  keys = jax.random.split(jax.random.key(0), 5)
  b, s = shape.batch, shape.length
  q = jax.random.normal(keys[0], (b, s, shape.heads, shape.head_dim), jnp.bfloat16)
  k, v = (jax.random.normal(key, (b, s, shape.kv_heads, shape.head_dim), jnp.bfloat16)
          for key in keys[1:3])
  cotangent = jax.random.normal(keys[3], q.shape, jnp.float32)
  lengths = jax.random.randint(keys[4], (b,), s // 2, s + 1).at[0].set(s)
  slots = jnp.arange(s)
  paddings = {"right": slots[None, :] < lengths[:, None],
              "left": slots[None, :] >= (s - lengths)[:, None]}

  def reference(q, k, v, key_valid):
    return layers.reference_attention(q, k, v, layers.causal_mask(key_valid, slots))

  def attend_fn(name: str) -> Callable[..., jax.Array]:
    if name.startswith("reference"):
      return reference
    return lambda q, k, v, key_valid: layers.causal_self_attention(q, k, v, key_valid, name)

  def value_and_grads(fn, rows, key_valid, *qkv):
    weights = cotangent * rows[:, :, None, None]
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, key_valid).astype(jnp.float32), *qkv)
    return out * rows[:, :, None, None], vjp(weights)

  f32 = lambda x: x.astype(jnp.float32)
  results: dict[str, Any] = {"shape": dataclasses.asdict(shape)}
  for padding, key_valid in paddings.items():
    # A query with no valid key before it (left padding's leading slots) has no defined
    # output in any implementation: only rows with one are compared.
    rows = (jnp.cumsum(key_valid, axis=1) > 0).astype(jnp.float32)
    want_out, want_grads = jax.jit(value_and_grads, static_argnums=0)(
        reference, rows, key_valid, f32(q), f32(k), f32(v))
    for name in ("reference_bf16",) + attention_implementations():
      row = results.setdefault(name, {})
      try:
        got_out, got_grads = jax.jit(value_and_grads, static_argnums=0)(
            attend_fn(name), rows, key_valid, q, k, v)
        errors = {"value": _relative_error(got_out, want_out),
                  **{f"grad_{n}": _relative_error(g, w)
                     for n, g, w in zip("qkv", got_grads, want_grads)}}
        row[padding] = {**errors, "ok": bool(
            errors["value"] <= VALUE_TOLERANCE
            and max(errors[f"grad_{n}"] for n in "qkv") <= GRAD_TOLERANCE)}
      except Exception as e:  # pylint: disable=broad-except  (recorded, the others go on)
        row[padding] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:500]}
  key_valid, rows = paddings["right"], jnp.ones((b, s), jnp.float32)
  for name in ("reference_bf16",) + attention_implementations():
    if "error" in results[name]["right"]:
      continue
    grad = jax.jit(jax.grad(lambda q, k, v, fn=attend_fn(name): jnp.sum(
        fn(q, k, v, key_valid).astype(jnp.float32) * cotangent), (0, 1, 2))
                   ).lower(q, k, v).compile()
    results[name]["calls_cudnn"] = "cudnn" in grad.as_text().lower()
    jax.block_until_ready(grad(q, k, v))
    results[name]["fwd_bwd_ms"] = 1e3 * timing.Timing.of(timing.time_calls(
        lambda grad=grad: grad(q, k, v), calls)).median
  return results


def run_sections(sections: dict[str, Callable[[dict[str, Any]], Any]],
                 results: dict[str, Any], save: Callable[[], None]) -> None:
  """Runs each ``fn(into)`` in order, into results[name] (a dict it may fill as it goes);
  an exception is recorded as results[name]["error"] and the next section runs; the
  seconds each took go to results[name]["seconds"]; ``save()`` after each."""
  for name, fn in sections.items():
    into = results.setdefault(name, {})
    t0 = time.perf_counter()
    try:
      fn(into)
    except Exception as e:  # pylint: disable=broad-except  (one section's failure, recorded)
      into["error"] = f"{type(e).__name__}: {e}"[:2000]
    into["seconds"] = time.perf_counter() - t0
    save()


def _f(x: Any, fmt: str) -> str:
  return "-" if x is None else format(x, fmt)


def markdown(r: dict[str, Any]) -> str:
  """The check's report: versions, the matmul rate, the attention table, the bench table
  (MFU against the measured rate and the published peak) and its other figures."""
  v = r.get("versions", {})
  lines = [f"GPU check on {v.get('device_count')} x {v.get('device_kind')} ({v.get('backend')}); "
           + ", ".join(f"{k} {v[k]}" for k in ("python",) + PACKAGES + ("torch_cuda", "torch_cudnn")
                       if v.get(k) is not None)]
  for name, section in r.items():
    if isinstance(section, dict) and "error" in section:
      lines.append(f"- section {name} FAILED: {section['error']}")
  m = r.get("matmul", {})
  spec = spec_of(str(v.get("device_kind", "")))
  if "bf16_tflops" in m:
    lines.append(f"- bfloat16 matmul {m['size']}^3: {m['bf16_tflops']:.3g} TFLOP/s measured"
                 + (f", {spec[0] / 1e12:.0f} published" if spec else ""))
  a = r.get("attention", {})
  if "shape" in a:
    sh = a["shape"]
    lines += ["", f"causal attention, bfloat16, q [{sh['batch']}, {sh['length']}, "
              f"{sh['heads']}, {sh['head_dim']}], {sh['kv_heads']} KV heads; relative error "
              "against the float32 reference (value / worst gradient)", "",
              "| implementation | right padding (structure) | left padding (dense mask) | "
              "fwd+bwd (ms) | calls cuDNN | ok |", "|---|---|---|---|---|---|"]
    for name, row in a.items():
      if name in ("shape", "seconds", "error"):
        continue
      cells = []
      for padding in ("right", "left"):
        c = row.get(padding, {})
        cells.append(c["error"][:80] if "error" in c else
                     f"{c['value']:.1e} / {max(c[f'grad_{n}'] for n in 'qkv'):.1e}")
      ok = all(row.get(p, {}).get("ok") for p in ("right", "left"))
      lines.append(f"| {name} | {cells[0]} | {cells[1]} | {_f(row.get('fwd_bwd_ms'), '.2f')} "
                   f"| {row.get('calls_cudnn', '-')} | {ok} |")
  for name in ("bench", "bench_xla"):
    lines += _bench_lines(name, r.get(name, {}), spec)
  return "\n".join(lines)


def _bench_lines(name: str, bench: dict[str, Any], spec: tuple[float, float] | None
                 ) -> list[str]:
  """The bench section's table and lines (none if it measured no bucket)."""
  lines: list[str] = []
  if bench.get("buckets"):
    measured = 1e9 * bench["roofline_gflops"]["bfloat16"]
    lines += ["", f"{name}: train step, batch {bench['batch_size']}, "
              f"text {bench['text_length']}, "
              f"{bench['compute_dtype']} compute, remat {bench['remat_policy']}, layers "
              f"{'scanned' if bench['scan_layers'] else 'unrolled'}", "",
              "| visual tokens | step (ms) | model TFLOP/step | TFLOP/s | MFU (measured "
              "bf16) | MFU (published) | compiled GiB | peak GiB | compile (s) | "
              "PyTorch peer (ms) | speed-up vs peer |", "|---" * 11 + "|"]
    for n, b in bench["buckets"].items():
      rate = b["gflop_per_step"] * 1e9 / b["step_s"]
      lines.append(
          f"| {n} | {1e3 * b['step_s']:.1f} | {b['gflop_per_step'] / 1e3:.2f} | "
          f"{rate / 1e12:.3g} | {rate / measured:.2f} | "
          f"{_f(spec and rate / spec[0], '.2f')} | {_f(b.get('compiled_gib'), '.1f')} | "
          f"{_f(b.get('peak_gib'), '.1f')} | {b['compile_s']:.0f} | "
          f"{_f(b.get('peer_step_s') and 1e3 * b['peer_step_s'], '.1f')} | "
          f"{_f(b.get('speedup_vs_peer'), '.2f')} |")
    mix_key = "mix_vs_fixed256" if "mix_vs_fixed256" in bench else "mix_vs_largest"
    if mix_key in bench:
      lines.append(f"\n- bucket mix {bench['mix']}: mean step {bench[mix_key]:.2f}x the "
                   "largest bucket's")
    if "generation" in bench:
      g = bench["generation"]
      lines.append(f"- decoding {g['new_tokens']} tokens at {g['num_tokens']} visual tokens, "
                   f"batch {g['batch']}: {g['cache_tokens_per_s']:.0f} tokens/s with the KV "
                   f"cache, {g['recompute_tokens_per_s']:.0f} recomputing "
                   f"({g['speedup']:.1f}x, same ids: {g['same_ids']})")
    if "peer_error" in bench:
      lines.append(f"- the PyTorch peer failed: {bench['peer_error'][:300]}")
    elif any("peer_loss" in b for b in bench["buckets"].values()):
      worst = max(abs(b["peer_loss"] - b["loss"]) for b in bench["buckets"].values()
                  if "peer_loss" in b)
      lines.append(f"- the peer ({bench.get('peer_device')}) starts from our parameters: "
                   f"first losses differ by at most {worst:.1e}")
  return lines
