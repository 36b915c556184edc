"""`loop.train_loop` with fake step functions, data, checkpoint manager and metrics:
bucket order, lagged metric fetches, written scalars, NaN/Inf stop, checkpoint cadence
and SIGTERM, without compiling anything."""

import functools
import json
import os
import signal

import numpy as np
import pytest

from tokenflex_jax.training import buckets, loop, steps
from tokenflex_jax.training.metrics import MetricWriter

COUNTS, PROBS, SEED = (64, 144, 256), (0.2, 0.3, 0.5), 7
BATCH = 8
count_for_step = functools.partial(buckets.token_count_for_step, SEED, counts=COUNTS,
                                   probs=PROBS)


class Value:
  """A metric "on device": records in ``events`` when the host reads it."""

  def __init__(self, value, step, events):
    self.value, self.step, self.events = value, step, events

  def __array__(self, dtype=None, copy=None):  # pylint: disable=redefined-builtin
    self.events.append(("read", self.step))
    return np.asarray(self.value, dtype=dtype)


class FakeManager:
  """Records what `checkpointing.save` hands to an Orbax manager."""

  def __init__(self, events):
    self.events, self.saves, self.waits = events, [], 0
    self.directory = "/fake/checkpoints"

  def save(self, step, args=None, force=False):
    assert force
    self.events.append(("save", step))
    self.saves.append((step, args["params"].item, args["meta"].item, args["data"].item))

  def wait_until_finished(self):
    self.events.append(("wait", None))
    self.waits += 1

  def all_steps(self):  # Committed steps whose checksums `checkpointing.finish` records.
    return []


class FakeWriter:
  def __init__(self):
    self.records = []

  def write(self, step, scalars):
    self.records.append((step, dict(scalars)))


def loss_of(step):
  return 1.0 + 0.01 * step


class Run:
  """A fake run: one step function per bucket recording (step, count, batch)."""

  def __init__(self, bad=None, on_step=None):
    self.events, self.calls, self.globalised = [], [], []
    self.bad = bad or {}          # step -> metrics overrides (NaN/Inf)
    self.on_step = on_step        # step -> called inside that step
    self.manager = FakeManager(self.events)

  def step_fn(self, count):
    def fn(state, batch):
      step = int(state.step)
      assert batch["globalised"], "the step got a batch that did not pass through to_global"
      self.calls.append((step, count, int(batch["index"])))
      self.events.append(("step", step))
      if self.on_step is not None:
        self.on_step(step)
      metrics = {"loss": Value(loss_of(step), step, self.events),
                 "grad_norm": np.float32(0.5), "learning_rate": np.float32(1e-3),
                 "useful_positions": np.float32(BATCH * count)}  # the visual tokens only
      metrics.update(self.bad.get(step, {}))
      new = steps.TrainState(np.int32(step + 1), {"w": np.float32(step + 1)}, {"mu": ()})
      return new, metrics
    return fn

  def to_global(self, batch):
    self.globalised.append(int(batch["index"]))
    return {**batch, "globalised": True}

  def run(self, start, total, every, writer=None, data=None, periodic=None):
    self.data = data if data is not None else iter(
        {"index": np.int32(i)} for i in range(10_000))
    writer = writer if writer is not None else FakeWriter()
    self.writer = writer
    reporter = loop.Reporter(writer, total, log_every=1000, global_batch=BATCH,
                             tokens_per_example=lambda n: n + 23,
                             flops_per_step={n: 1e9 * n for n in COUNTS})
    saver = loop.Saver(self.manager, every, lambda step: {"step": step})
    state = steps.TrainState(np.int32(start), {"w": np.float32(start)}, {"mu": ()})
    return loop.train_loop(state, start, total,
                           loop.BucketSteps({n: self.step_fn(n) for n in COUNTS}.__getitem__,
                                            count_for_step),
                           loop.DataFeed(self.data, self.to_global), saver, reporter,
                           periodic)


def test_each_step_runs_its_buckets_step_on_the_next_batch():
  """Step s runs by_count[count_for_step(s)] on the s-th batch (after to_global); a
  resumed loop continues the same bucket sequence."""
  full = Run()
  full.run(0, 30, every=7)
  expected = [count_for_step(s) for s in range(30)]
  assert len(set(expected)) > 1, "the seed draws a single bucket: the test sees no order"
  assert [c for _, c, _ in full.calls] == expected
  assert [s for s, _, _ in full.calls] == list(range(30))
  assert [i for _, _, i in full.calls] == list(range(30))  # one batch per step, in order
  assert full.globalised == list(range(30))

  resumed = Run()
  resumed.run(13, 30, every=7)
  assert [(s, c) for s, c, _ in resumed.calls] == [(s, c) for s, c, _ in full.calls[13:]]


def _index(events, event):
  return events.index(event)


def test_metrics_are_fetched_one_step_late_except_before_a_save():
  """Step s's metrics are read after step s+1 is dispatched (and before s+2), unless
  step s completes a checkpoint (every 4th, and the last), where they are read
  before the save and before step s+1; each step's metrics are read exactly once."""
  r = Run()
  total, every = 11, 4
  r.run(0, total, every)
  ev = r.events
  for s in range(total):
    assert ev.count(("read", s)) == 1, f"step {s} read {ev.count(('read', s))} times"
    read = _index(ev, ("read", s))
    assert read > _index(ev, ("step", s))
    if (s + 1) % every == 0 or s + 1 == total:
      save = _index(ev, ("save", s + 1))
      assert read < save, f"step {s}: saved before its metrics were checked"
      if s + 1 < total:
        assert save < _index(ev, ("step", s + 1))
    else:
      assert _index(ev, ("step", s + 1)) < read, f"step {s} was read before step {s + 1} ran"
      if s + 2 < total:
        assert read < _index(ev, ("step", s + 2)), f"step {s} read more than one step late"
  assert ev[-1] == ("wait", None)


def test_written_scalars(tmp_path):
  """Every step is written exactly once, as step+1, with its own loss and bucket, the
  per-bucket copies and throughput consistent with the step time."""
  writer = MetricWriter(str(tmp_path))
  r = Run()
  start, total = 3, 17
  r.run(start, total, every=5, writer=writer)
  writer.close()
  with open(os.path.join(tmp_path, "metrics.jsonl"), encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  assert [rec["step"] for rec in records] == list(range(start + 1, total + 1))
  for rec in records:
    s, n = rec["step"] - 1, count_for_step(rec["step"] - 1)
    assert rec["train/loss"] == pytest.approx(loss_of(s))
    assert rec["train/num_tokens"] == n
    assert rec["train/grad_norm"] == pytest.approx(0.5)
    assert rec["train/learning_rate"] == pytest.approx(1e-3)
    per_bucket = {k for k in rec if k.startswith("train_")}
    assert per_bucket == {f"train_{n}tokens/{k}" for k in
                          ("loss", "grad_norm", "step_time_s", "tokens_per_s_per_device")}
    assert rec[f"train_{n}tokens/loss"] == rec["train/loss"]
    t = rec["train/step_time_s"]
    assert t > 0 and rec[f"train_{n}tokens/step_time_s"] == t
    assert rec["train/examples_per_s"] == pytest.approx(BATCH / t)
    assert rec["train/tokens_per_s_per_device"] == pytest.approx(BATCH * (n + 23) / t / 8)
    assert rec["train/tflops_per_device"] == pytest.approx(1e9 * n / t / 1e12)
    assert rec["train/useful_share"] == pytest.approx(n / (n + 23))  # of the paid positions
    assert rec["train/useful_tokens_per_s_per_device"] == pytest.approx(BATCH * n / t / 8)
    assert "train/useful_positions" not in rec
    assert 10 < rec["train/host_rss_mib"] < 1e6  # this test process's resident memory
    assert "train/device_peak_gib" not in rec  # a CPU device keeps no memory_stats
  assert os.listdir(tmp_path / "tensorboard")


@pytest.mark.parametrize("bad", [{"loss": np.float32(np.nan)},
                                 {"grad_norm": np.float32(np.inf)}], ids=["nan_loss", "inf_grad"])
def test_non_finite_metrics_stop_the_run_before_a_save(bad):
  """A NaN loss or Inf gradient norm at (0-based) step 3 raises NonFiniteLossError
  naming the step (as completed steps, 4) and its bucket; the state after it is never
  checkpointed, and the SIGTERM handler is restored."""
  before = signal.getsignal(signal.SIGTERM)
  r = Run(bad={3: bad})
  with pytest.raises(loop.NonFiniteLossError) as e:
    r.run(0, 20, every=4)
  message = str(e.value)
  assert "step 4:" in message and f"at {count_for_step(3)} visual tokens" in message
  assert [s for s, *_ in r.manager.saves] == []
  assert signal.getsignal(signal.SIGTERM) is before
  # Without a checkpoint due, the error comes one step late (the fetch is lagged) and
  # stops the run there.
  r = Run(bad={3: bad})
  with pytest.raises(loop.NonFiniteLossError, match="step 4:"):
    r.run(0, 20, every=100)
  assert [s for s, *_ in r.calls] == [0, 1, 2, 3, 4]
  assert r.manager.saves == []


@pytest.mark.parametrize("start,total,every,expected", [
    (0, 10, 3, [3, 6, 9, 10]),
    (0, 9, 3, [3, 6, 9]),
    (4, 10, 3, [6, 9, 10]),
    (0, 5, 100, [5]),
    (7, 7, 3, []),
])
def test_checkpoint_cadence(start, total, every, expected):
  """Saves at multiples of ``every`` and at ``total_steps`` (once), with the state and
  data position of that step; waits for the saves; returns (state, steps completed)."""
  r = Run()
  state, done = r.run(start, total, every)
  assert [s for s, *_ in r.manager.saves] == expected
  for step, params, meta, data in r.manager.saves:
    assert float(params["w"]) == step  # the state after `step` steps, not a later one
    assert meta == {"step": step}
    assert data is r.data
  # Each save starts after the one before it finished (its checksums are then recorded),
  # and the loop waits for the last.
  assert r.manager.waits == len(expected) + 1 and r.events[-1] == ("wait", None)
  assert all(r.events[i - 1] == ("wait", None) for i, e in enumerate(r.events) if e[0] == "save")
  assert done == total and int(state.step) == total and float(state.params["w"]) == total
  assert int(next(r.data)["index"]) == total - start  # exactly one batch per step taken


def test_sigterm_saves_the_current_step_and_returns():
  """SIGTERM during step 4 (0-based) saves after that step (5 completed) and returns
  early with 5, the data iterator just past 5 batches; the previous handler is back."""
  seen = []
  previous = signal.signal(signal.SIGTERM, lambda *_: seen.append("old handler"))
  try:
    mine = signal.getsignal(signal.SIGTERM)
    r = Run(on_step=lambda s: os.kill(os.getpid(), signal.SIGTERM) if s == 4 else None)
    state, done = r.run(0, 50, every=100)
    assert done == 5 and int(state.step) == 5
    assert [s for s, *_ in r.manager.saves] == [5]
    assert float(r.manager.saves[0][1]["w"]) == 5
    assert [s for s, *_ in r.calls] == [0, 1, 2, 3, 4]
    assert int(next(r.data)["index"]) == 5
    assert [step for step, _ in r.writer.records] == [1, 2, 3, 4, 5]
    assert r.manager.waits == 2  # before the save, and for it at the end
    assert seen == [], "the loop's handler should have caught the signal"
    assert signal.getsignal(signal.SIGTERM) is mine
  finally:
    signal.signal(signal.SIGTERM, previous)


def test_sigterm_on_a_checkpoint_step_saves_once():
  """SIGTERM in a step that is due a checkpoint anyway saves that step once."""
  r = Run(on_step=lambda s: os.kill(os.getpid(), signal.SIGTERM) if s == 5 else None)
  previous = signal.getsignal(signal.SIGTERM)
  _, done = r.run(0, 50, every=3)
  assert done == 6 and [s for s, *_ in r.manager.saves] == [3, 6]
  assert signal.getsignal(signal.SIGTERM) is previous



def test_host_counters_reach_the_metrics():
  """What `host_counters` returns at a report (e.g. skipped bad records) is logged with
  that step's scalars."""
  writer = FakeWriter()
  counts = {"skipped_records": 0.0}
  reporter = loop.Reporter(writer, 10, log_every=1000, global_batch=BATCH,
                           tokens_per_example=lambda n: n, flops_per_step={},
                           host_counters=lambda: dict(counts))
  reporter.report(0, 64, {"loss": np.float32(1.0)})
  counts.update(skipped_records=2.0, **{"skipped_records/unreadable_image": 2.0})
  reporter.report(1, 64, {"loss": np.float32(1.0)})
  (_, first), (_, second) = writer.records
  assert first["train/skipped_records"] == 0
  assert second["train/skipped_records"] == 2
  assert second["train/skipped_records/unreadable_image"] == 2


class DeviceWithMemory:
  """What a GPU's or TPU's ``memory_stats()`` holds (jax_bridge's keys), in bytes."""

  def memory_stats(self):
    return {"bytes_in_use": 2**30, "peak_bytes_in_use": 3 * 2**30,
            "bytes_limit": 15.75 * 2**30, "largest_alloc_size": 2**29}


def test_the_device_memory_its_runtime_counts_reaches_the_metrics_and_the_log(
    monkeypatch, caplog):
  """On a device whose runtime counts its memory (GPU, TPU) each step's scalars hold its
  peak and limit in GiB, and the console line the peak; a CPU's None is none of them."""
  assert loop.device_memory_gib(None) == {}
  assert loop.device_memory_gib({"bytes_in_use": 5}) == {}
  monkeypatch.setattr(loop.jax, "local_devices", lambda: [DeviceWithMemory()])
  writer = FakeWriter()
  reporter = loop.Reporter(writer, 10, log_every=1, global_batch=BATCH,
                           tokens_per_example=lambda n: n, flops_per_step={})
  with caplog.at_level("INFO"):
    reporter.report(0, 64, {"loss": np.float32(1.0)})
  (_, scalars), = writer.records
  assert scalars["train/device_peak_gib"] == 3.0
  assert scalars["train/device_limit_gib"] == 15.75
  assert "device_peak_gib=3 " in caplog.text
  # A backend that raises instead of returning None reports without the figures.
  class Unimplemented:
    def memory_stats(self):
      raise RuntimeError("UNIMPLEMENTED: memory_stats")
  monkeypatch.setattr(loop.jax, "local_devices", lambda: [Unimplemented()])
  reporter = loop.Reporter(writer, 10, log_every=1, global_batch=BATCH,
                           tokens_per_example=lambda n: n, flops_per_step={})
  reporter.report(1, 64, {"loss": np.float32(1.0)})
  assert "train/device_peak_gib" not in writer.records[-1][1]


def test_periodic_evaluation_runs_after_its_steps_on_their_parameters():
  """``Periodic(every=4)`` over steps [2, 10): called after steps 4 and 8 with the
  parameters those steps produced, after the step's own metrics, and its scalars written
  at that step."""
  r = Run()
  seen = []

  def evaluate(params, step):
    seen.append((step, float(params["w"])))
    r.events.append(("eval", step))
    return {"eval/64tokens/average": step / 100}

  r.run(2, 10, every=100, periodic=loop.Periodic(4, evaluate))
  assert seen == [(4, 4.0), (8, 8.0)]
  written = {step: s for step, s in r.writer.records if "eval/64tokens/average" in s}
  assert written == {4: {"eval/64tokens/average": 0.04}, 8: {"eval/64tokens/average": 0.08}}
  steps_logged = [step for step, s in r.writer.records if "train/loss" in s]
  assert steps_logged == list(range(3, 11))  # every step's metrics still written once
  # The evaluation of step 4 comes after step 4 ran and before step 5 (index 4) ran.
  assert r.events.index(("eval", 4)) < r.events.index(("step", 4))
  assert not loop.Periodic(0, evaluate).due(4)


def test_periodic_evaluation_runs_before_its_steps_save():
  """At a step both saved and evaluated the evaluation comes first: a run killed while
  it evaluates resumes from the save before and evaluates the step again."""
  r = Run()

  def evaluate(params, step):
    r.events.append(("eval", step))
    return {"eval/x": 1.0}

  r.run(0, 8, every=4, periodic=loop.Periodic(4, evaluate))
  for step in (4, 8):
    assert r.events.index(("eval", step)) < r.events.index(("save", step))


def test_an_evaluation_that_fails_saves_its_step_first():
  r = Run()

  def evaluate(params, step):
    raise OSError("the eval file is gone")

  with pytest.raises(OSError, match="the eval file is gone"):
    r.run(0, 8, every=4, periodic=loop.Periodic(4, evaluate))
  assert ("save", 4) in r.events and ("step", 4) not in r.events  # 0-based step 4 not run


def test_a_step_of_microbatches_at_several_counts_reports_their_mean(tmp_path):
  """A draw of one count per microbatch (`config.count_per_microbatch`): the step's
  visual tokens, positions and FLOPs are its microbatches' mean (each 1/k of the batch),
  and no per-bucket copy is written (the step is at no single bucket)."""
  writer = MetricWriter(str(tmp_path))
  reporter = loop.Reporter(writer, 2, log_every=1000, global_batch=BATCH,
                           tokens_per_example=lambda n: n + 23,
                           flops_per_step={n: 1e9 * n for n in COUNTS})
  metrics = {"loss": np.float32(1.5), "grad_norm": np.float32(0.5),
             "useful_positions": np.float32(BATCH * 100)}
  reporter.report(0, (64, 144, 256, 64), metrics)
  writer.close()
  with open(os.path.join(tmp_path, "metrics.jsonl"), encoding="utf-8") as f:
    (rec,) = [json.loads(line) for line in f]
  mean, t = (64 + 144 + 256 + 64) / 4, rec["train/step_time_s"]
  assert rec["train/num_tokens"] == mean
  assert rec["train/tokens_per_s_per_device"] == pytest.approx(BATCH * (mean + 23) / t / 8)
  assert rec["train/tflops_per_device"] == pytest.approx(1e9 * mean / t / 1e12)
  assert rec["train/useful_share"] == pytest.approx(100 / (mean + 23))
  assert not [k for k in rec if k.startswith("train_")]


def test_a_step_of_microbatches_at_one_count_reports_as_that_bucket(tmp_path):
  writer = MetricWriter(str(tmp_path))
  reporter = loop.Reporter(writer, 2, log_every=1000, global_batch=BATCH,
                           tokens_per_example=lambda n: n + 23,
                           flops_per_step={n: 1e9 * n for n in COUNTS})
  reporter.report(0, (144, 144), {"loss": np.float32(1.5), "grad_norm": np.float32(0.5)})
  writer.close()
  with open(os.path.join(tmp_path, "metrics.jsonl"), encoding="utf-8") as f:
    (rec,) = [json.loads(line) for line in f]
  assert rec["train/num_tokens"] == 144 and rec["train_144tokens/loss"] == 1.5
