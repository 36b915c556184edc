"""Row layouts without a model: first-fit packing, the useful share of a layout, the
mix665k-shaped lengths, and the planning command."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.xla_env import REPO
from tokenflex_jax import errors
from tokenflex_jax.data import pack, synthetic_llava
from tokenflex_jax.data.pack import Lengths, RowShape


def test_first_fit_fills_rows_in_stream_order_within_both_capacities():
  shape = RowShape(text_capacity=10, image_slots=2)
  convs = [Lengths(6, 1), Lengths(6, 1), Lengths(3, 1), Lengths(4, 0), Lengths(1, 1),
           Lengths(1, 0)]
  # 0 opens row A; 1 does not fit A (12 > 10): row B; 2 fits A (9, 2 images); 3 fits B
  # (10, 1 image); 4 needs an image slot: A is full of images, B has 0 text left: row C;
  # 5 fits A (10 text).
  assert pack.pack(convs, shape) == [[0, 2, 5], [1, 3], [4]]
  assert pack.pack(convs, shape) == pack.pack(convs, shape)  # deterministic


def test_first_fit_closes_the_oldest_row_beyond_open_rows():
  shape = RowShape(10, 1)
  packer = pack.FirstFit(shape, open_rows=2)
  assert packer.add(0, Lengths(8, 1)) == [] and packer.add(1, Lengths(8, 1)) == []
  assert packer.add(2, Lengths(8, 1)) == [[0]]    # a third open row closes the first
  assert packer.add(3, Lengths(2, 0)) == []       # first fit: the oldest open row (1)
  assert packer.finish() == [[1, 3], [2]]
  with pytest.raises(ValueError, match="open_rows"):
    pack.FirstFit(shape, open_rows=0)


def test_every_conversation_lands_once_and_no_row_overflows():
  lengths = synthetic_llava.mix665k_lengths(3000, seed=1, multi_image_share=0.2)
  shape = RowShape(1024, 6)
  rows = pack.pack(lengths, shape, open_rows=16)
  assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
  for row in rows:
    clipped = [pack.clip(lengths[i], shape)[0] for i in row]
    assert sum(c.text_tokens for c in clipped) <= 1024
    assert sum(c.images for c in clipped) <= 6
    assert row == sorted(row)


def test_useful_share_by_hand():
  convs = [Lengths(9, 1), Lengths(4, 0), Lengths(30, 2)]
  padded = pack.figures(convs, pack.padded_shape(11), (4, 16), packed=False)
  # One per row: 10 text tokens + 1 image slot each; the third cut to 10 tokens, 1 image.
  assert padded.rows == 3 and padded.truncated_share == pytest.approx(1 / 3)
  assert padded.useful_share[4] == pytest.approx((9 + 4 + 4 + 10 + 4) / (3 * (10 + 4)))
  assert padded.useful_share[16] == pytest.approx((9 + 16 + 4 + 10 + 16) / (3 * 26))
  packed = pack.figures(convs, RowShape(20, 2), (4,), packed=True)
  # Row 1: conversations 0 and 1 (13 text, 1 image); row 2: the third cut to 20, 2 images.
  assert packed.rows == 2 and packed.conversations_per_row == 1.5
  assert packed.useful_share[4] == pytest.approx((13 + 4 + 20 + 8) / (2 * (20 + 8)))


def test_balanced_image_slots_follow_the_datas_images_per_token():
  convs = [Lengths(100, 1)] * 9 + [Lengths(100, 0)]
  assert pack.balanced_image_slots(convs, 1000) == 9
  assert pack.balanced_image_slots([Lengths(50, 0)], 1000) == 1


@pytest.mark.parametrize("seed", [0, 3])
def test_best_image_slots_is_the_planners_best_from_the_balance_up(seed):
  rng = np.random.default_rng(seed)
  convs = [Lengths(int(t), int(i)) for t, i in zip(rng.lognormal(5.4, 0.7, 300),
                                                   rng.random(300) < 0.93)]
  mean_share = lambda k: np.mean(list(pack.figures(convs, RowShape(1536, k), (64, 256),
                                                   packed=True).useful_share.values()))
  best = pack.best_image_slots(convs, 1536, (64, 256))
  assert best >= pack.balanced_image_slots(convs, 1536)
  assert mean_share(best) >= mean_share(pack.balanced_image_slots(convs, 1536))
  assert mean_share(best) > mean_share(best + 1)


def test_mix665k_lengths_have_the_mixtures_shape():
  lengths = synthetic_llava.mix665k_lengths(40_000, seed=0)
  assert lengths == synthetic_llava.mix665k_lengths(40_000, seed=0)
  text = np.array([c.text_tokens for c in lengths])
  images = np.array([c.images for c in lengths])
  assert 150 <= text.mean() <= 360 and text.min() >= synthetic_llava.MIN_TOKENS
  assert np.percentile(text, 99) > 4 * np.median(text)  # a long tail
  rows = {s.name: s.rows for s in synthetic_llava.SOURCES}
  assert np.mean(images == 0) == pytest.approx(rows["sharegpt"] / sum(rows.values()), abs=0.01)
  assert set(images) == {0, 1}
  multi = synthetic_llava.mix665k_lengths(10_000, seed=0, multi_image_share=0.5, max_images=3)
  counts = np.array([c.images for c in multi])
  assert set(counts) == {0, 1, 2, 3} and 0.4 < np.mean(counts >= 2) < 0.5


def test_a_lengths_file_round_trips_and_a_bad_line_is_named(tmp_path):
  path = str(tmp_path / "rows.jsonl")
  lengths = synthetic_llava.mix665k_lengths(50, seed=3)
  synthetic_llava.write_lengths(path, lengths)
  assert synthetic_llava.read_lengths(path) == lengths
  (tmp_path / "bad.jsonl").write_text('{"text_tokens": 5, "images": 1}\n{"text_tokens": -1, '
                                      '"images": 0}\n')
  with pytest.raises(errors.InputError, match=r"bad\.jsonl:2: want"):
    synthetic_llava.read_lengths(str(tmp_path / "bad.jsonl"))
  with pytest.raises(errors.InputError, match="no such file"):
    synthetic_llava.read_lengths(str(tmp_path / "none.jsonl"))


def test_the_planning_command_on_the_paper_config(tmp_path):
  """Packed rows of 1536 text tokens and 6 image slots (`configs/paper.py:pack=1`) keep at
  least 0.85 of every bucket's positions useful on mix665k-shaped rows, under 2%
  truncated; padded rows of 1024 tokens keep under half."""
  lengths, out = tmp_path / "rows.jsonl", tmp_path / "plan.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run(
      [sys.executable, "-m", "tokenflex_jax.data.packing", "--config=configs/paper.py",
       f"--lengths={lengths}", "--synthetic=20000", "--text_capacity=1536",
       "--images_per_row=6", f"--json_out={out}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  plan = json.loads(out.read_text())
  assert list(plan["buckets"]) == ["64", "144", "256"]
  for b in plan["buckets"].values():
    assert b["useful_share_packed"] >= 0.85 and b["useful_share_padded"] < 0.5
    assert b["packed_vs_padded"] >= 2.0
  assert plan["packed"]["truncated_share"] <= 0.02
  assert "| 256 | 0.3" in result.stdout and "packed / padded" in result.stdout
  # `:pack=1` itself: the row training builds is the planner's packed row by default.
  packed_config = subprocess.run(
      [sys.executable, "-m", "tokenflex_jax.data.packing", "--config=configs/paper.py:pack=1",
       f"--lengths={lengths}", f"--json_out={out}"], cwd=REPO, env=env, capture_output=True,
      text=True, timeout=300)
  assert packed_config.returncode == 0, packed_config.stderr[-3000:]
  packed_plan = json.loads(out.read_text())
  assert packed_plan["packed"] == plan["packed"]
  assert packed_plan["padded_length"] == 1542 and "one per row of 1542 token slots" in (
      packed_config.stdout)
  bad = subprocess.run([sys.executable, "-m", "tokenflex_jax.data.packing",
                        "--config=configs/paper.py", f"--lengths={tmp_path / 'none.jsonl'}"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert bad.returncode == errors.USAGE_EXIT_CODE
  assert bad.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'none.jsonl'}: no such file"


@pytest.mark.parametrize("flag,line", [
    ("--open_rows=0", "error: --open_rows=0 must be >= 1"),
    ("--images_per_row=-2", "error: --images_per_row=-2 must be >= 0"),
])
def test_the_planning_command_refuses_a_bad_flag_in_one_line(tmp_path, flag, line):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run([sys.executable, "-m", "tokenflex_jax.data.packing",
                           "--config=configs/paper.py", f"--lengths={tmp_path / 'r.jsonl'}",
                           "--synthetic=10", flag], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == errors.USAGE_EXIT_CODE, result.stderr[-3000:]
  assert result.stderr.strip().splitlines()[-1] == line
  assert not (tmp_path / "r.jsonl").exists()
