"""The benchmark's report: one markdown table (printed and written) and its JSON."""

from __future__ import annotations

import json
import os
from typing import Any

from tokenflex_jax.benchmarking import profile


def _f(x: Any, fmt: str) -> str:
  return "-" if x is None else format(x, fmt)


def markdown(r: dict[str, Any]) -> str:
  """The report as markdown: the per-bucket table, then one line per other figure."""
  roof = r["roofline_gflops"]
  layouts = r["layouts"]
  other = next((k for k in layouts if k != ("scanned" if r["scan_layers"] else "unrolled")),
               None)
  lines = [
      f"train step, batch {r['batch_size']}, layers "
      f"{'scanned' if r['scan_layers'] else 'unrolled'}, frozen: {r['frozen'] or 'none'}, "
      f"{r['device_count']} x {r['device_kind']}; roofline {roof['float32']:.1f} GFLOP/s "
      f"float32, {roof['bfloat16']:.1f} bfloat16",
      "",
      "| visual tokens | step (ms) | spread (ms) | examples/s | model GFLOP/step/device | "
      "XLA's count | GFLOP/s/device | MFU (f32) | PyTorch peer (ms) | speed-up vs peer | "
      "compile (s) |" + (f" {other}: compile (s) | {other}: step (ms) |" if other else ""),
      "|---" * (11 + (2 if other else 0)) + "|"]
  for n, b in r["buckets"].items():
    peer = b.get("peer_step_s")
    row = (f"| {n} | {1e3 * b['step_s']:.0f} | {1e3 * b['step_spread_s'][0]:.0f}-"
           f"{1e3 * b['step_spread_s'][1]:.0f} | {b['examples_per_s']:.1f} | "
           f"{b['gflop_per_step']:.2f} | {b['xla_gflop_per_step']:.2f} | "
           f"{b['gflop_per_s_per_device']:.1f} | {b['mfu']:.2f} | "
           f"{_f(peer and 1e3 * peer, '.0f')} | {_f(b.get('speedup_vs_peer'), '.2f')} | "
           f"{b['compile_s']:.1f} |")
    if other:
      row += (f" {layouts[other]['compile_s'][n]:.1f} | "
              f"{1e3 * layouts[other]['step_s'][n]:.0f} |")
    lines.append(row)
  mix_key = "mix_vs_fixed256" if "mix_vs_fixed256" in r else "mix_vs_largest"
  g, p = r["generation"], r["pipeline"]
  lines += [
      "",
      f"- bucket mix {r['mix']}: mean step {r[mix_key]:.2f}x the largest bucket's",
      f"- input pipeline: {p['examples_per_s']:.0f} examples/s, "
      f"{r['pipeline_vs_consumption']:.1f}x what the fastest step consumes "
      f"({p['consumed_examples_per_s']:.0f}/s)",
      f"- generation, {g['new_tokens']} new tokens at {g['num_tokens']} visual tokens, batch "
      f"{g['batch']}: {g['cache_tokens_per_s']:.0f} tokens/s with the KV cache, "
      f"{g['recompute_tokens_per_s']:.0f} recomputing, {r['kv_cache_speedup']:.1f}x"
      f" (same ids: {g['same_ids']})"]
  if any("peer_loss" in b for b in r["buckets"].values()):
    worst = max(abs(b["peer_loss"] - b["loss"]) for b in r["buckets"].values()
                if "peer_loss" in b)
    lines.append(f"- the peer's first loss equals ours to {worst:.1e} at every bucket")
  if "real_data" in r:
    lines += ["", real_data_markdown(r["real_data"])]
  if "profile" in r:
    lines += ["", profile.markdown(r["profile"], r["profile"]["bucket"])]
  return "\n".join(lines)


def real_data_markdown(d: dict[str, Any]) -> str:
  """The real-data section (`real_data.measure`) as a table."""
  s = d["setup"]
  lines = [f"real data: {s['conversations']} synthetic mix665k-shaped conversations "
           f"(lengths x {s['scale']}, mean {s['mean_text_tokens']:.0f} text tokens); padded "
           f"rows of {s['padded']['token_slots']} slots, {s['padded']['rows_per_batch']} per "
           f"batch; packed rows of {s['packed']['text_capacity']} text tokens and "
           f"{s['packed']['image_slots']} image slots, {s['packed']['rows_per_batch']} per "
           "batch; the peer: length-grouped batches padded to their longest row. Rates over "
           f"an epoch ({s['padded']['epoch_batches']} / {s['packed']['epoch_batches']} "
           f"batches), {s['batches_timed']} of each timed", "",
           "| visual tokens | useful share, padded | useful share, packed | useful tokens/s, "
           "padded | packed | peer | packed / padded | packed / peer |",
           "|---" * 8 + "|"]
  for n, b in d["buckets"].items():
    lines.append(f"| {n} | {b['useful_share_padded']:.3f} | {b['useful_share_packed']:.3f} | "
                 f"{b['useful_tokens_per_s_padded']:.0f} | {b['useful_tokens_per_s_packed']:.0f}"
                 f" | {_f(b.get('useful_tokens_per_s_peer'), '.0f')} | "
                 f"{b['packed_vs_padded']:.2f} | {_f(b.get('packed_vs_peer'), '.2f')} |")
  return "\n".join(lines)


def write_real_data(r: dict[str, Any], out_dir: str) -> str:
  """`write` for a run of the real-data section alone."""
  return _write(r, out_dir, real_data_markdown(r["real_data"]))


def write(r: dict[str, Any], out_dir: str) -> str:
  """Writes ``out_dir``/bench.json and bench.md; returns the markdown."""
  return _write(r, out_dir, markdown(r))


def _write(r: dict[str, Any], out_dir: str, text: str) -> str:
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "bench.json"), "w", encoding="utf-8") as f:
    json.dump(r, f, indent=2)
  with open(os.path.join(out_dir, "bench.md"), "w", encoding="utf-8") as f:
    f.write(text + "\n")
  return text
