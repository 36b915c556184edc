r"""Converts Hugging Face checkpoints into a workdir the train binary starts from, and
a trained workdir into a Hugging Face folder.

Import towers (a SigLIP vision tower and/or a Qwen2 / Llama LLM):

  python -m tokenflex_jax.convert --config=configs/demo.py --workdir=/ckpt/start \
      --vision=/models/siglip-so400m-patch14-384 --llm=/models/Qwen2.5-7B-Instruct

writes an Orbax checkpoint WORKDIR/checkpoints/0 with params {"vit", "llm"} (each tensor
read, converted and placed on the mesh of --config with its sharding one at a time (a
per-layer weight with all its layers stacked), so no host holds the whole model) and
WORKDIR/model_overrides.txt, the ``--config.model.*`` flags that make the config's model
shape match the converted one (not its compute dtype: a checkpoint's storage dtype is
not the run's, so ``config.model.*.dtype`` stays the config's). Then:

  python -m tokenflex_jax.train --config=... $(cat /ckpt/start/model_overrides.txt) \
      --config.init.checkpoint=/ckpt/start --workdir=/runs/stage1

Export (the workdir's own config, as every binary without ``--config``): the whole
trained VLM as one folder transformers loads with ``trust_remote_code=True``
(`app.hf_export`), and with ``--towers_to`` its ViT and LLM as plain SigLIP and
Qwen2 / Llama folders:

  python -m tokenflex_jax.convert --workdir=/runs/stage3 --export_to=/out/tokenflex \
      [--towers_to=/out/towers]

Import such a folder back (params {"vit", "projector", "llm"}, bit-exact):

  python -m tokenflex_jax.convert --config=configs/demo.py --workdir=/ckpt/again \
      --vlm=/out/tokenflex
"""

from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import app, flags, logging

from tokenflex_jax import sharding
from tokenflex_jax.app import cli, config_checks, config_schema, hf_export, trained_model
from tokenflex_jax.models import hf
from tokenflex_jax.models.llm import LLM, LLMConfig
from tokenflex_jax.models.vit import ViT, ViTConfig
from tokenflex_jax.models.vlm import VLM, VLMConfig
from tokenflex_jax.specs import RunSpec
from tokenflex_jax.training import checkpointing, compiled, steps

OVERRIDES_FILE = "model_overrides.txt"
OPTIONAL_LLM_FIELDS = ("rope_type", "rope_factor", "rope_low_freq_factor",
                       "rope_high_freq_factor", "rope_original_max_positions",
                       "max_positions")
# How the run computes, not what the checkpoint holds: never written as an override.
COMPUTE_FIELDS = ("dtype",)


def _shardings(module: nn.Module, example_inputs: tuple, mesh, rules):
  return compiled.shardings_of(steps.abstract_params(
      lambda r: module.init(r, *example_inputs)["params"], mesh, rules))


def _placer(shardings):
  """place(path, array) -> a global jax.Array laid out by the parameter's sharding."""
  def place(path, array):
    sh = shardings
    for key in path:
      sh = sh[key]
    return jax.make_array_from_callback(array.shape, sh, lambda index: array[index])
  return place


def overrides(vit: ViTConfig | None, llm: LLMConfig | None) -> list[str]:
  """``--config.model.{vit,llm}.FIELD=VALUE`` flags for the converted configs' shapes
  (every field but `COMPUTE_FIELDS`).

  The LLM's ``rope_*`` scaling fields are written only when they differ from their
  defaults: a config file that does not list them then still accepts the flags (a
  flag for a key the config lacks is an error). A scaled-RoPE LLM needs them listed.
  """
  flags_out = []
  llm_defaults = dataclasses.asdict(LLMConfig())
  for name, cfg in (("vit", vit), ("llm", llm)):
    if cfg is None:
      continue
    for k, v in dataclasses.asdict(cfg).items():
      if k in COMPUTE_FIELDS:
        continue
      if name == "llm" and k in OPTIONAL_LLM_FIELDS and v == llm_defaults[k]:
        continue
      flags_out.append(f"--config.model.{name}.{k}={v}")
  return flags_out


def vlm_overrides(config: VLMConfig) -> list[str]:
  """`overrides` of the towers plus the projector's fields and the visual positions."""
  flags_out = overrides(config.vit, config.llm)
  for k, v in dataclasses.asdict(config.projector).items():
    if k not in COMPUTE_FIELDS:
      flags_out.append(f"--config.model.projector.{k}={v}")
  flags_out += [f"--config.model.visual_position_span={config.visual_position_span}",
                f"--config.model.visual_position_layout={config.visual_position_layout}"]
  return flags_out


def _write_start(workdir: str, params: dict, converted_from: dict[str, str],
                 flags_out: list[str]) -> None:
  """Checkpoint 0 of ``workdir`` and its overrides file."""
  os.makedirs(workdir, exist_ok=True)
  with checkpointing.make_manager(workdir, asynchronous=False) as manager:
    checkpointing.save_params(manager, 0, params, {"step": 0, "converted_from": converted_from})
  if jax.process_index() == 0:
    with open(os.path.join(workdir, OVERRIDES_FILE), "w", encoding="utf-8") as f:
      f.write("\n".join(flags_out) + "\n")
  logging.info("wrote %s/checkpoints/0 and %s", workdir, OVERRIDES_FILE)


def import_folder(config: config_schema.ConfigDict | RunSpec, workdir: str, vlm_dir: str
                  ) -> list[str]:
  """Writes an exported TokenFLEX folder's weights as checkpoint 0 of ``workdir``
  (placed on the mesh of ``config``); returns the overrides of its model."""
  config = config_schema.to_spec(config)
  mesh, rules = sharding.mesh_from_config(config)
  vlm_cfg = hf.vlm_config_from_hf(hf.read_config(vlm_dir))
  size = vlm_cfg.vit.image_size
  example = (jnp.zeros((1, size, size, 3)), jnp.zeros((1, 8), jnp.int32), config.token_counts[0])
  _, params = hf.import_vlm(vlm_dir, _placer(_shardings(VLM(vlm_cfg), example, mesh, rules)))
  flags_out = vlm_overrides(vlm_cfg)
  _write_start(workdir, params, {"vlm": vlm_dir}, flags_out)
  return flags_out


def import_towers(config: config_schema.ConfigDict | RunSpec, workdir: str,
                  vision_dir: str | None, llm_dir: str | None) -> list[str]:
  """Writes the converted towers as checkpoint 0 of ``workdir``; returns the overrides."""
  if not vision_dir and not llm_dir:
    raise app.UsageError("give --vision and/or --llm (Hugging Face model directories), "
                         "--vlm (an exported TokenFLEX folder) or --export_to / --towers_to")
  config = config_schema.to_spec(config)
  mesh, rules = sharding.mesh_from_config(config)
  params, vit_cfg, llm_cfg = {}, None, None
  if vision_dir:
    vit_cfg = hf.vision_config_from_hf(hf.read_config(vision_dir))
    image = jnp.zeros((1, vit_cfg.image_size, vit_cfg.image_size, 3))
    _, params["vit"] = hf.import_vision(
        vision_dir, _placer(_shardings(ViT(vit_cfg), (image,), mesh, rules)))
    logging.info("imported the vision tower from %s: %s", vision_dir, vit_cfg)
  if llm_dir:
    llm_cfg = hf.llm_config_from_hf(hf.read_config(llm_dir))
    tokens = jnp.zeros((1, 8), jnp.int32)
    _, params["llm"] = hf.import_llm(
        llm_dir, _placer(_shardings(LLM(llm_cfg), (tokens,), mesh, rules)))
    logging.info("imported the LLM from %s: %s", llm_dir, llm_cfg)
  flags_out = overrides(vit_cfg, llm_cfg)
  _write_start(workdir, params, {"vision": vision_dir or "", "llm": llm_dir or ""}, flags_out)
  return flags_out


def export(config: config_schema.ConfigDict | RunSpec, workdir: str, out_dir: str | None,
           towers_dir: str | None, llm_type: str, dtype: str = "float32") -> None:
  """The workdir's latest checkpoint as a Hugging Face folder at ``out_dir``
  (`hf_export.export_folder`) and/or its ViT and LLM as SigLIP and Qwen2 / Llama folders
  under ``towers_dir``; ``llm_type`` "" picks qwen2 for an LLM with q/k/v biases, else
  llama; the weights in ``dtype`` (float32 or bfloat16)."""
  config = config_schema.to_spec(config)
  mesh, rules = sharding.mesh_from_config(config)
  trained = trained_model.load(config, workdir, mesh, rules)
  model = trained.model.config
  llm_type = llm_type or ("qwen2" if model.llm.qkv_bias else "llama")
  host = jax.tree.map(jax.device_get, trained.params)
  if jax.process_index() != 0:
    return
  if out_dir:
    hf_export.export_folder(model, host, trained.tokenizer, out_dir, llm_type,
                            config.token_counts, config.eval.max_new_tokens, dtype)
    logging.info("exported step %d of %s to %s", trained.step, workdir, out_dir)
  if towers_dir:
    hf.export_vision(model.vit, host["vit"], os.path.join(towers_dir, "vision"), dtype=dtype)
    hf.export_llm(model.llm, host["llm"], os.path.join(towers_dir, "llm"), llm_type, dtype)
    logging.info("exported the towers of step %d of %s to %s/{vision,llm}", trained.step,
                 workdir, towers_dir)


def main() -> None:
  config, workdir = cli.define_flags()
  process_flags = cli.define_distributed_flags()
  vision = flags.DEFINE_string("vision", None, "Hugging Face SigLIP directory to import.")
  llm = flags.DEFINE_string("llm", None, "Hugging Face Qwen2/Llama directory to import.")
  vlm = flags.DEFINE_string("vlm", None, "An exported TokenFLEX folder to import.")
  export_to = flags.DEFINE_string(
      "export_to", None, "Export the workdir's model here as a Hugging Face folder.")
  towers_to = flags.DEFINE_string(
      "towers_to", None, "Export the workdir's ViT and LLM here as SigLIP and Qwen2/Llama "
      "folders (vision/, llm/).")
  llm_type = flags.DEFINE_enum("llm_type", "", ("",) + hf.LLM_TYPES,
                               "Exported LLM family; default: qwen2 with q/k/v biases, "
                               "else llama.")
  export_dtype = flags.DEFINE_enum(
      "export_dtype", "float32", hf.EXPORT_DTYPES, "The exported weights' dtype: float32 "
      "(bit-exact) or bfloat16 (half the bytes, as released checkpoints ship).")

  def run(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    spec = config_schema.to_spec(config_schema.loaded(config))
    cli.start_processes(*process_flags)
    # Before anything is read or written.
    exporting = bool(export_to.value or towers_to.value)
    config_checks.check(spec, config_checks.PREDICT if exporting
                        else config_checks.IMPORT_TOWERS)
    if exporting:
      export(spec, workdir.value, export_to.value, towers_to.value, llm_type.value,
             export_dtype.value)
    elif vlm.value:
      print("\n".join(import_folder(spec, workdir.value, vlm.value)))
    else:
      print("\n".join(import_towers(spec, workdir.value, vision.value, llm.value)))

  cli.run_main(run)


if __name__ == "__main__":
  main()
