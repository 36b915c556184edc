r"""Converts Hugging Face towers into a workdir the train binary starts from, and back.

Import (a SigLIP vision tower and/or a Qwen2 / Llama LLM):

  python -m tokenflex_jax.convert --config=configs/demo.py --workdir=/ckpt/start \
      --vision=/models/siglip-so400m-patch14-384 --llm=/models/Qwen2.5-7B-Instruct

writes an Orbax checkpoint WORKDIR/checkpoints/0 with params {"vit", "llm"} (each tensor
read, converted and placed on the mesh of --config with its sharding one at a time (a
per-layer weight with all its layers stacked), so
no host holds the whole model) and WORKDIR/model_overrides.txt, the
``--config.model.*`` flags that make the config's model shape match the converted one
(not its compute dtype: a checkpoint's storage dtype is not the run's, so
``config.model.*.dtype`` stays the config's). Then:

  python -m tokenflex_jax.train --config=... $(cat /ckpt/start/model_overrides.txt) \
      --config.init.checkpoint=/ckpt/start --workdir=/runs/stage1

Export (a trained workdir's ViT and LLM to Hugging Face directories /out/vision and
/out/llm, and every weight of the VLM, projector included, in our layout to /out/vlm):

  python -m tokenflex_jax.convert --workdir=/runs/stage3 --export_to=/out

(the workdir's own config, as every binary without ``--config``).
"""

from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import app, flags, logging

from tokenflex_jax import sharding, specs
from tokenflex_jax.app import cli, config_checks, config_schema, trained_model
from tokenflex_jax.models import hf
from tokenflex_jax.models.llm import LLM, LLMConfig
from tokenflex_jax.models.vit import ViT, ViTConfig
from tokenflex_jax.specs import RunSpec
from tokenflex_jax.training import checkpointing, compiled, steps

OVERRIDES_FILE = "model_overrides.txt"
OPTIONAL_LLM_FIELDS = ("rope_type", "rope_factor", "rope_low_freq_factor",
                       "rope_high_freq_factor", "rope_original_max_positions")
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


def import_towers(config: config_schema.ConfigDict | RunSpec, workdir: str,
                  vision_dir: str | None, llm_dir: str | None) -> list[str]:
  """Writes the converted towers as checkpoint 0 of ``workdir``; returns the overrides."""
  if not vision_dir and not llm_dir:
    raise app.UsageError("give --vision and/or --llm (Hugging Face model directories)")
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
  os.makedirs(workdir, exist_ok=True)
  with checkpointing.make_manager(workdir, asynchronous=False) as manager:
    checkpointing.save_params(manager, 0, params, {"step": 0, "converted_from": {
        "vision": vision_dir or "", "llm": llm_dir or ""}})
  flags_out = overrides(vit_cfg, llm_cfg)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, OVERRIDES_FILE), "w", encoding="utf-8") as f:
      f.write("\n".join(flags_out) + "\n")
  logging.info("wrote %s/checkpoints/0 and %s", workdir, OVERRIDES_FILE)
  return flags_out


def export_towers(config: config_schema.ConfigDict | RunSpec, workdir: str, out_dir: str,
                  llm_type: str) -> None:
  """Writes the workdir's latest ViT and LLM as Hugging Face directories under out_dir,
  and every weight of the VLM (projector included) in our layout under out_dir/vlm."""
  config = config_schema.to_spec(config)
  mesh, rules = sharding.mesh_from_config(config)
  trained = trained_model.load(config, workdir, mesh, rules)
  host = jax.tree.map(jax.device_get, trained.params)
  hf.export_vision(trained.model.config.vit, host["vit"], os.path.join(out_dir, "vision"))
  hf.export_llm(trained.model.config.llm, host["llm"], os.path.join(out_dir, "llm"), llm_type)
  hf.export_vlm(host, specs.as_dict(config.model), os.path.join(out_dir, "vlm"))
  logging.info("exported step %d of %s to %s/{vision,llm,vlm}", trained.step, workdir, out_dir)


def main() -> None:
  config, workdir = cli.define_flags()
  process_flags = cli.define_distributed_flags()
  vision = flags.DEFINE_string("vision", None, "Hugging Face SigLIP directory to import.")
  llm = flags.DEFINE_string("llm", None, "Hugging Face Qwen2/Llama directory to import.")
  export_to = flags.DEFINE_string("export_to", None,
                                  "Export the workdir's ViT and LLM here instead of importing.")
  llm_type = flags.DEFINE_enum("llm_type", "qwen2", hf.LLM_TYPES, "Exported LLM family.")

  def run(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    spec = config_schema.to_spec(config_schema.loaded(config))
    cli.start_processes(*process_flags)
    # Before anything is read or written.
    config_checks.check(spec, config_checks.PREDICT if export_to.value
                        else config_checks.IMPORT_TOWERS)
    if export_to.value:
      export_towers(spec, workdir.value, export_to.value, llm_type.value)
    else:
      print("\n".join(import_towers(spec, workdir.value, vision.value, llm.value)))

  cli.run_main(run)


if __name__ == "__main__":
  main()
