"""The paper config compiled from shapes alone (no weights) by the TPU compiler (libtpu,
on this host) for a v5e 8x8 slice and by the CPU compiler on 64 host devices, and a
small VLM for a TPU topology."""

import json
import os
import subprocess
import sys

import pytest

from tests.xla_env import REPO


def _run_aot(*flags) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "tokenflex_jax.aot", *flags], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=1200)


def _aot(*flags, target="--num_cpu_devices=64"):
  result = _run_aot(target, *flags)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def _rows(stdout):
  rows = [line.split("|")[1:-1] for line in stdout.splitlines() if line.startswith("| ")]
  return {int(r[0]): [float(x) for x in r[1:7]] for r in rows[1:]}  # no roofline off a TPU


def _tpu_figures(tmp_path, *flags):
  out = tmp_path / "aot.json"
  stdout = _aot("--config=configs/paper.py:stage=3", f"--json_out={out}", *flags,
                target="--topology=v5e:8x8")
  assert "mesh {'data': 1, 'fsdp': 64, 'tensor': 1} of TPU v5 lite; attention splash" in stdout
  with open(out, encoding="utf-8") as f:
    return {int(n): r for n, r in json.load(f).items()}


@pytest.mark.slow
def test_paper_model_fits_a_16_gib_v5e_chip_by_the_tpu_compiler(tmp_path):
  """Stage 3 of the full paper model as configured (remat "dots") at its largest bucket,
  compiled by the TPU compiler for a v5e 8x8 slice: at most 16 GiB per chip (its HBM).
  Two minutes; CI compiles a small VLM for a TPU topology instead (below)."""
  r = _tpu_figures(tmp_path, "--config.token_counts=(256,)", "--config.token_probs=(1.0,)")[256]
  assert r["tpu_kernels"] > 0 and r["flops"] > 0 and r["roofline_step_s"] > 0
  assert r["estimated_step_s"] > r["roofline_step_s"], r
  assert r["argument_gib"] > 0 and r["temp_gib"] > 0
  assert r["total_gib"] <= 16.0, r


@pytest.mark.slow
def test_paper_remat_is_the_least_recomputation_that_fits_a_v5e_chip(tmp_path):
  """Every bucket fits 16 GiB with "dots"; keeping everything ("none") does not fit even
  the smallest bucket."""
  dots = _tpu_figures(tmp_path)
  assert sorted(dots) == [64, 144, 256]
  assert all(r["total_gib"] <= 16.0 for r in dots.values()), dots
  assert dots[64]["flops"] < dots[144]["flops"] < dots[256]["flops"]
  # The TPU compiler refuses a step that does not fit the chip: one line naming the
  # bucket, the compiler's figures and the fields to change.
  result = _run_aot("--topology=v5e:8x8", "--config=configs/paper.py:stage=3",
                    "--config.model.remat_policy=none", "--config.token_counts=(64,)",
                    "--config.token_probs=(1.0,)")
  assert result.returncode == 2, result.stderr[-3000:]
  line = result.stderr.strip().splitlines()[-1]
  assert line.startswith("error: the VLM train step at bucket 64 does not fit a device's "
                         "memory (RESOURCE_EXHAUSTED: "), line
  assert "exceeds available HBM" in line and "config.model.remat_policy=dots" in line


@pytest.mark.slow
def test_paper_model_compiles_on_64_host_devices():
  """The CPU compiler's figures for the same step (a comparison only: a CPU's, not a
  TPU's; docs/performance.md): every bucket compiles from shapes alone."""
  out = _aot("--config=configs/paper.py:stage=3")
  assert "mesh {'data': 1, 'fsdp': 64, 'tensor': 1} of cpu; attention blocked" in out
  assert all(line.endswith("| - |") for line in out.splitlines() if line.startswith("| 64 "))
  rows = _rows(out)
  assert sorted(rows) == [64, 144, 256]
  for n, (_, gflop, xla_gflop, args, temps, total) in rows.items():
    assert gflop > 0 and xla_gflop > 0 and args > 0 and temps > 0 and total >= args, n
  # More visual tokens, more work per step.
  assert rows[64][1] < rows[144][1] < rows[256][1]


def test_a_tpu_topology_is_compiled_by_the_tpu_compiler_with_splash(tmp_path):
  """--topology=v5e:2x2 from this CPU host: the target's devices make the mesh, "auto"
  attention is splash, lowered by Mosaic into the TPU program (its kernel calls counted),
  and the JSON holds the TPU compiler's memory, FLOPs, bytes and the roofline bound, and
  (--compile_profile) where the compiler's time went, read from libtpu's log; a lower
  config.compiler_optimization_level compiles another program."""
  out = tmp_path / "aot.json"
  stdout = _aot("--config=configs/demo.py", "--config.token_counts=(64,)",
                "--config.token_probs=(1.0,)", f"--json_out={out}", "--compile_profile",
                target="--topology=v5e:2x2")
  assert "mesh {'data': 4, 'fsdp': 1, 'tensor': 1} of TPU v5 lite; attention splash" in stdout
  with open(out, encoding="utf-8") as f:
    r = json.load(f)["64"]
  for key in ("total_gib", "compile_s", "flops", "bytes_accessed", "roofline_step_s"):
    assert r[key] > 0, (key, r)
  assert r["tpu_kernels"] > 0  # splash's kernels, in the ViT's and the decoder's layers
  assert r["roofline_step_s"] == max(r["flops"] / 197e12, r["bytes_accessed"] / 819e9)
  assert r["estimated_step_s"] > 0  # the compiler's cycles at a v5e's clock
  # The memory is libtpu's own count from its log: the temporaries its heap, the total the
  # arguments plus the program's HBM; PJRT's temporaries (a training log's) hold the
  # heap's fragmentation twice, in the heap and again beside it.
  from tokenflex_jax.benchmarking import tpu_memory
  hbm = tpu_memory.read(stdout.split("libtpu's log: ")[1].split()[0])[-1]
  assert 0 < hbm.fragmentation_bytes < hbm.heap_bytes < hbm.program_bytes, hbm
  assert r["temp_gib"] * 2**30 == hbm.heap_bytes
  assert r["total_gib"] * 2**30 == pytest.approx(
      max(r["argument_gib"], r["output_gib"]) * 2**30 + hbm.program_bytes)
  assert r["pjrt_temp_gib"] * 2**30 == pytest.approx(
      hbm.heap_bytes + hbm.fragmentation_bytes, rel=0.01), (r, hbm)
  p = r["compile_profile"]
  assert p["kernels"] > 50 and p["threads"] >= 1 and p["longest_kernel_s"] > 0
  assert p["instructions"] > 10 * p["kernels"]  # machine instructions, every kernel's
  assert 0 < p["stages_s"]["BACKEND_PASSES"] < p["stages_s"]["END_TO_END"] <= r["compile_s"]
  # The kernels fill the backend's threads: their seconds add up to at most its span times
  # the threads, and to more than half of one thread's.
  backend = p["stages_s"]["BACKEND_PASSES"]
  assert 0.5 * backend < p["kernel_s"] <= 1.05 * backend * p["threads"], p
  assert p["host_cores"] == len(os.sched_getaffinity(0))
  assert {"vit", "llm", "projector"} <= {part.split()[0] for part in p["by_part_s"]}
  assert {"vit backward", "llm backward"} <= set(p["by_part_s"])
  assert sum(p["by_part_s"].values()) == pytest.approx(p["kernel_s"])
  projected = list(p["projected_s"].values())
  assert projected == sorted(projected, reverse=True) and projected[-1] < r["compile_s"]
  assert "| 64 | " in stdout.split("| projected compile (s) on 8 / 16 / 32 cores |")[1]
  assert os.path.isdir(stdout.split("libtpu's log: ")[1].split()[0])
  # config.compiler_optimization_level reaches the TPU compiler: another program.
  fast_out = tmp_path / "o1.json"
  _aot("--config=configs/demo.py", "--config.token_counts=(64,)", "--config.token_probs=(1.0,)",
       f"--json_out={fast_out}", "--config.compiler_optimization_level=O1",
       target="--topology=v5e:2x2")
  with open(fast_out, encoding="utf-8") as f:
    fast = json.load(f)["64"]
  assert (fast["temp_gib"], fast["bytes_accessed"]) != (r["temp_gib"], r["bytes_accessed"])


def test_microbatches_at_their_own_counts_compile_for_a_tpu_topology(tmp_path):
  """The pieces of a step whose microbatches draw their own counts (an accumulator, an
  add per bucket, one update) compile for a TPU topology, whose devices hold no arrays;
  the compiler's estimate of the step counts each piece as often as it runs (close to
  the one program that accumulates the same microbatches in a loop)."""
  flags = ("--config=configs/demo.py", "--config.token_counts=(64,144)",
           "--config.token_probs=(0.5,0.5)", "--config.microbatches=2")
  result = _run_aot("--topology=v5e:2x2", *flags, "--config.count_per_microbatch=True",
                    f"--json_out={tmp_path / 'pieces.json'}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "memory figures kept" not in result.stderr  # libtpu's count of every piece
  rows = _rows(result.stdout)
  assert sorted(rows) == [64, 144] and rows[64][1] < rows[144][1], result.stdout
  _aot(*flags, f"--json_out={tmp_path / 'loop.json'}", target="--topology=v5e:2x2")
  estimates = [{int(n): r["estimated_step_s"] for n, r in
                json.loads((tmp_path / f"{name}.json").read_text()).items()}
               for name in ("pieces", "loop")]
  for n in (64, 144):
    assert 0.8 < estimates[0][n] / estimates[1][n] < 1.25, estimates
  # Where the compiler's time went is read one program per bucket: refused here.
  result = _run_aot("--topology=v5e:2x2", "--compile_profile", "--config=configs/demo.py",
                    "--config.microbatches=2", "--config.count_per_microbatch=True")
  assert result.returncode != 0 and "compiles several" in result.stderr, result.stderr[-300:]


def test_an_unknown_topology_is_one_line():
  result = _run_aot("--topology=v5e:3x5x9", "--config=configs/demo.py")
  assert result.returncode == 2, result.stderr[-3000:]
  assert result.stderr.strip().splitlines()[-1].startswith("error: --topology=v5e:3x5x9: ")


def test_a_profile_without_topology_is_refused():
  result = _run_aot("--compile_profile", "--config=configs/demo.py")
  assert result.returncode != 0
  assert "--compile_profile reads the TPU compiler's log: give --topology" in result.stderr


def test_libtpu_log_lines_make_each_program_s_hbm():
  """`tpu_memory.parse`: each "Program hbm requirement" block's total and the heap and
  fragmentation of its "HLO temp" line (none: no temporaries; never another block's),
  in libtpu's binary units."""
  from tokenflex_jax.benchmarking import tpu_memory
  log = """I1207 08:10:15.644296   31867 deepsea_compiler_backend.cc:2171] Total hbm usage >= 13.64G:
    reserved        258.03M
    program          11.93G
I1207 08:10:15.644306   31867 deepsea_compiler_backend.cc:2175] Program sflag requirement 364B:
    HLO temp            96B (100.0% utilization: Unpadded (92B) Padded (92B), 4.2% fragmentation (4B))
Program hbm requirement 11.93G:
    global            1.50M
    scoped           40.88M
    HLO temp         11.81G (98.8% utilization: Unpadded (10.34G) Padded (10.46G), 11.4% fragmentation (1.35G))
    overlays         81.12M
Program vmem requirement 127.60M:
    HLO temp        112.00M (0.0% utilization: Unpadded (0B) Padded (0B), 100.0% fragmentation (112.00M))
Program hbm requirement 775.5K:
    global            52.0K
    overlays         723.5K
Program host requirement 0B:
I1207 08:27:31.000000    1448 deepsea_compiler_backend.cc:2175] Program sflag requirement 408B:
    HLO temp           140B (100.0% utilization: Unpadded (140B) Padded (140B), 0.0% fragmentation (0B))
Program hbm requirement 19.57M:
    HLO temp          8.00M (84.2% utilization: Unpadded (2.66M) Padded (3.16M), 60.5% fragmentation (4.84M))""".splitlines()
  first, no_temporaries, second = tpu_memory.parse(log)
  assert no_temporaries == tpu_memory.ProgramHbm(round(775.5 * 2**10), 0, 0)
  assert first == tpu_memory.ProgramHbm(round(11.93 * 2**30), round(11.81 * 2**30),
                                        round(1.35 * 2**30))
  assert second == tpu_memory.ProgramHbm(round(19.57 * 2**20), 8 * 2**20,
                                         round(4.84 * 2**20))
  assert tpu_memory.size_bytes("4.0K") == 4096 and tpu_memory.size_bytes("140B") == 140
  with pytest.raises(ValueError, match="not a libtpu size"):
    tpu_memory.size_bytes("12 GiB")


def test_libtpu_log_lines_make_each_program_s_kernels_and_stages():
  from tokenflex_jax.benchmarking import compile_profile
  backend = "deepsea_compiler_backend.cc"
  log = f"""Log file created at: 2026/12/07 00:50:17
I1207 00:50:20.000000   100 deepsea_compiler_hlo_passes.cc:6241] HLO_PASSES stage duration: 3.25s
I1207 00:50:21.000000   201 {backend}:3769] [fusion.1] LLO optimizing 40 instructions
I1207 00:50:21.500000   202 {backend}:3769] [reshape.7] LLO optimizing 502,793 instructions
I1207 00:50:22.000000   201 {backend}:3422] XLA::TPU LLO dependency graph-based ... time: 1 ms
I1207 00:50:23.000000   201 {backend}:3769] [fusion.2] LLO optimizing 18 instructions
I1207 00:50:24.000000   201 {backend}:3769] [fusion.2] LLO optimizing 17 instructions
I1207 00:50:25.000000   201 {backend}:3422] XLA::TPU LLO dependency graph-based ... time: 1 ms
I1207 00:50:31.500000   202 {backend}:3422] XLA::TPU LLO dependency graph-based ... time: 2 ms
I1207 00:50:32.000000   100 deepsea_compiler_base.cc:3931] BACKEND_PASSES stage duration: 11.0s
I1207 00:50:33.000000   100 deepsea_compiler_backend.cc:1488] CODE_GENERATION stage duration: 605ms
I1207 00:50:34.000000   100 deepsea_compiler_base.cc:985] END_TO_END stage duration: 1m2.5s
I1207 00:51:00.000000   203 {backend}:3769] [fusion.1] LLO optimizing 40 instructions
I1207 00:51:02.000000   203 {backend}:3422] XLA::TPU LLO dependency graph-based ... time: 1 ms
I1207 00:51:03.000000   100 deepsea_compiler_base.cc:985] END_TO_END stage duration: 3s
""".splitlines()
  first, second = compile_profile.parse(log)
  # fusion.2 compiled twice (libtpu's retry): both attempts are the compiler's work.
  assert first.kernels == pytest.approx({"fusion.1": 2.0, "reshape.7": 10.0, "fusion.2": 2.0})
  assert first.threads == 2 and second.threads == 1
  assert first.stages == pytest.approx({"HLO_PASSES": 3.25, "BACKEND_PASSES": 11.0,
                                        "CODE_GENERATION": 0.605, "END_TO_END": 62.5})
  assert second.kernels == pytest.approx({"fusion.1": 2.0})
  assert first.instructions == {"fusion.1": 40, "reshape.7": 502_793, "fusion.2": 18 + 17}
  assert second.instructions == {"fusion.1": 40}
  hlo = """  %reshape.7 = bf16[6,729,4304] reshape(%x), metadata={op_name="jit(f)/transpose(jvp(VLM.text_hidden))/VLM.patches/vit/while/body/fc1/reshape"}
  %fusion.1 = f32[8] fusion(%y), metadata={op_name="jit(f)/jvp(VLM.text_hidden)/llm.decode/layers/q/dot_general"}
  ROOT %fusion.2 = f32[8] fusion(%z)
"""
  got = compile_profile.summary(first, hlo, compile_seconds=70.0, host_cores=2,
                                cores=(1, 64))
  assert got["by_part_s"] == pytest.approx({"vit backward": 10.0, "llm": 2.0, "unnamed": 2.0})
  assert got["longest_kernel"] == "reshape.7" and got["kernel_s"] == pytest.approx(14.0)
  assert got["instructions"] == 40 + 502_793 + 18 + 17
  # 70 s less the backend's 11 s, plus all the kernels on 1 core (14 s) or, on 64, the
  # longest kernel (10 s).
  assert got["projected_s"] == pytest.approx({"1": 73.0, "64": 69.0})
  # On 1 host core the kernels' seconds (14) overlap: the work is the backend's 11 s.
  alone = compile_profile.summary(first, hlo, compile_seconds=70.0, host_cores=1, cores=(1,))
  assert alone["projected_s"] == pytest.approx({"1": 70.0})


_LOOPS_HLO = """HloModule loops

%kernel (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %e = f32[4]{0} exponential(%p), backend_config={"estimated_cycles":"1000"}
}

%inner_condition (s: (s32[], f32[4])) -> pred[] {
  %s = (s32[], f32[4]{0}) parameter(0)
  %i = s32[] get-tuple-element(%s), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%inner_body (s: (s32[], f32[4])) -> (s32[], f32[4]) {
  %s = (s32[], f32[4]{0}) parameter(0)
  %i = s32[] get-tuple-element(%s), index=0
  %one = s32[] constant(1)
  %j = s32[] add(%i, %one)
  %x = f32[4]{0} get-tuple-element(%s), index=1
  %f = f32[4]{0} fusion(%x), kind=kLoop, calls=%kernel, backend_config={"estimated_cycles":"5"}
  ROOT %t = (s32[], f32[4]{0}) tuple(%j, %f)
}

%outer_condition (s: (s32[], f32[4])) -> pred[] {
  %s = (s32[], f32[4]{0}) parameter(0)
  %i = s32[] get-tuple-element(%s), index=0
  %n = s32[] constant(7)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%outer_body (s: (s32[], f32[4])) -> (s32[], f32[4]) {
  %s = (s32[], f32[4]{0}) parameter(0)
  %w = (s32[], f32[4]{0}) while(%s), condition=%inner_condition, body=%inner_body
  %x = f32[4]{0} get-tuple-element(%w), index=1
  %c = f32[4]{0} copy(%x), backend_config={"estimated_cycles":"2"}
  %i = s32[] get-tuple-element(%s), index=0
  ROOT %t = (s32[], f32[4]{0}) tuple(%i, %c)
}

ENTRY %main (a: f32[4]) -> f32[4] {
  %a = f32[4]{0} parameter(0)
  %zero = s32[] constant(0)
  %t = (s32[], f32[4]{0}) tuple(%zero, %a)
  %w = (s32[], f32[4]{0}) while(%t), condition=%outer_condition, body=%outer_body
  %x = f32[4]{0} get-tuple-element(%w), index=1
  ROOT %g = f32[4]{0} fusion(%x), calls=%kernel, backend_config={"estimated_cycles":"10"}
}
"""


def test_the_compilers_cycle_estimate_runs_each_kernel_once_per_loop_trip():
  """`tpu_cycles.estimated_cycles`: an annotated instruction counts once per run of its
  computation (nested loops multiply their trip counts, read from each condition), a
  fusion's insides never; a program without estimates, or with a loop whose trip count
  cannot be read, has no estimate."""
  from tokenflex_jax.benchmarking import tpu_cycles
  assert tpu_cycles.estimated_cycles(_LOOPS_HLO) == 10 + 7 * (2 + 3 * 5)
  unknown = _LOOPS_HLO.replace("%n = s32[] constant(3)",
                               "%n = s32[] get-tuple-element(%s), index=0")
  assert tpu_cycles.estimated_cycles(unknown) is None
  assert tpu_cycles.estimated_cycles(_LOOPS_HLO.replace('"estimated_cycles"', '"other"')) is None
  known = _LOOPS_HLO.replace(
      "body=%inner_body", 'body=%inner_body, backend_config={"known_trip_count":{"n":"4"}}')
  assert tpu_cycles.estimated_cycles(known) == 10 + 7 * (2 + 4 * 5)


_SCAN_CYCLES = """
import json, os, sys
import jax, jax.numpy as jnp
from tokenflex_jax import aot
from tokenflex_jax.benchmarking import tpu_cycles
os.environ.update(aot.compile_only_environment("v5e:2x2"))
device = aot.tpu_devices("v5e:2x2")[0]
on = jax.sharding.SingleDeviceSharding(device)
x = jax.ShapeDtypeStruct((512, 512), jnp.bfloat16, sharding=on)
layers = lambda x, w: jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w)[0]
out = {}
for n in (3, 6, 12):
  w = jax.ShapeDtypeStruct((n, 512, 512), jnp.bfloat16, sharding=on)
  out[n] = tpu_cycles.estimated_cycles(jax.jit(layers).lower(x, w).compile().as_text())
cpu = jax.jit(layers).lower(jnp.ones((4, 4)), jnp.ones((3, 4, 4))).compile().as_text()
out["cpu"] = tpu_cycles.estimated_cycles(cpu)
print(json.dumps(out))
"""


def test_the_tpu_compilers_estimate_grows_with_a_scans_length():
  """The TPU compiler (libtpu, compiling for v5e 2x2 on this host) annotates a scanned
  matmul layer's kernels; the estimate grows by the same cycles per layer at 3, 6 and 12
  layers, so each trip is counted; a CPU program has none."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", _SCAN_CYCLES], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  got = json.loads(result.stdout.strip().splitlines()[-1])
  assert got["cpu"] is None
  per_layer = (got["6"] - got["3"]) / 3
  assert per_layer > 0 and got["12"] - got["6"] == 6 * per_layer, got
  # A 512 x 512 x 512 bfloat16 matmul is 2.7e8 FLOPs: at most a v5e's 131,072 per cycle.
  assert per_layer >= 2 * 512**3 / 131072, got
