"""Checkpoints: exact resume after SIGKILL, SIGTERM, corrupt checkpoints, other meshes, export, non-finite guard."""

import json
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from gptjax import checkpoint, config as config_lib, loader, loop, sharding, train
from gptjax.model import GPTConfig
from tests.helpers import build, quick_run_config, random_tokens, tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUN_FLAGS = ["--config.model.n_layer=1", "--config.model.n_head=2", "--config.model.n_embd=32",
             "--config.model.block_size=16", "--config.data.vocab_size=300", "--config.train.batch_size=8",
             "--config.train.eval_every=0", "--config.log.every_steps=1", "--config.log.samples=0",
             "--config.checkpoint.every_steps=4", "--config.train.warmup_steps=3"]


def _command(workdir, corpus, steps):
  return [sys.executable, "-m", "gptjax.main", "--config=configs/quickstart.py", f"--workdir={workdir}",
          f"--config.data.path={corpus}", f"--config.train.steps={steps}", *RUN_FLAGS]


def _losses(workdir) -> dict[int, float]:
  """Train loss per step; a step logged twice (before a kill and after resuming) keeps its last value."""
  rows = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["train_loss"] for r in rows if "train_loss" in r}


def _wait_for_step(workdir, step, process, timeout=300):
  deadline = time.time() + timeout
  metrics = pathlib.Path(workdir) / "metrics.jsonl"
  while time.time() < deadline and process.poll() is None:
    if metrics.exists() and max(_losses(workdir), default=0) >= step:
      return
    time.sleep(0.2)
  raise AssertionError(f"the run did not reach step {step}")


@pytest.mark.slow
def test_sigkill_and_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path, corpus):
  steps = 40
  reference = subprocess.run(_command(tmp_path / "ref", corpus, steps), cwd=ROOT, capture_output=True, text=True)
  assert reference.returncode == 0, reference.stderr[-2000:]
  killed = subprocess.Popen(_command(tmp_path / "run", corpus, steps), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
  _wait_for_step(tmp_path / "run", 14, killed)
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  saved = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
  assert saved and saved[-1] < steps, saved  # killed mid-run, after some checkpoints
  reached = max(_losses(tmp_path / "run"))
  resumed = subprocess.run(_command(tmp_path / "run", corpus, steps), cwd=ROOT, capture_output=True, text=True)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resumed from" in resumed.stdout
  assert _losses(tmp_path / "run") == _losses(tmp_path / "ref")  # bitwise: same floats, every step
  # Where the hours went: both runs, and the steps between the checkpoint and the step the killed run reached.
  time_split = json.loads((tmp_path / "run" / "summary.json").read_text())["time"]
  run, runs = time_split["this_run"], time_split["all_runs"]
  assert run["start_step"] == saved[-1] and run["reached_step"] == steps
  assert run["recomputed_steps"] == runs["recomputed_steps"] == reached - saved[-1] and runs["runs"] == 2
  assert run["seconds"]["compile"] > 0 and run["seconds"]["steps"] > run["recomputed_seconds"] >= 0
  np.testing.assert_allclose(sum(run["seconds"].values()), run["wall_seconds"], rtol=1e-6)
  assert runs["wall_seconds"] > run["wall_seconds"] and 0 < run["goodput"] < 1
  productive = run["seconds"]["steps"] - run["recomputed_seconds"]
  np.testing.assert_allclose(run["goodput"], productive / run["wall_seconds"])
  assert re.search(r"time: \S+ = startup .* \| goodput \d+% \(2 runs of this workdir: \S+, goodput \d+%\)",
                   resumed.stdout)


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_exits_0(tmp_path, corpus):
  process = subprocess.Popen(_command(tmp_path / "run", corpus, 100000), cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
  _wait_for_step(tmp_path / "run", 6, process)
  process.send_signal(signal.SIGTERM)
  stdout, stderr = process.communicate(timeout=300)
  assert process.returncode == 0, stderr[-2000:]
  assert "stopped by SIGTERM" in stdout
  last = max(_losses(tmp_path / "run"))
  assert (tmp_path / "run" / "checkpoints" / str(last) / "commit_success.txt").exists()


def test_truncated_latest_checkpoint_is_skipped_and_named(tmp_path, corpus, capsys):
  config = quick_run_config(corpus)
  loop.run(config, str(tmp_path))
  step_dir = tmp_path / "checkpoints" / "8" / "state"
  for f in step_dir.rglob("*"):
    if f.is_file() and f.stat().st_size > 100:
      f.write_bytes(f.read_bytes()[:50])  # a torn write
  mngr = checkpoint.manager(str(tmp_path), config)
  model_cfg = GPTConfig.from_config(config.model, config_lib.check_vocab(config, 300))
  mesh = sharding.make_mesh(config)
  _, abstract, shardings = train.abstract_state(config, model_cfg, mesh, train.make_optimizer(config))
  with pytest.raises(checkpoint.CheckpointError, match=r"checkpoints/8 cannot be read"):
    checkpoint.restore(mngr, 8, abstract, shardings)
  state, step = checkpoint.restore_latest(mngr, abstract, shardings)
  assert step == 4 and int(state["step"]) == 4
  assert "falling back to the previous checkpoint" in capsys.readouterr().out
  # The run itself resumes from step 4 and finishes.
  info = loop.run(quick_run_config(corpus, steps=10), str(tmp_path))
  assert info.step == 10


def test_a_checkpoint_of_another_model_is_refused_and_kept(tmp_path, corpus):
  loop.run(quick_run_config(corpus, steps=4), str(tmp_path))
  other = quick_run_config(corpus, steps=6)
  other.model.n_embd = 64
  with pytest.raises(config_lib.ConfigError, match=r"checkpoints/4 holds a model of another shape than this "
                                                   r"config's: params.* is \(1, 32\) there and \(1, 64\) here"):
    loop.run(other, str(tmp_path))
  assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["4"]  # not set aside as "corrupt"


def test_a_checkpoint_from_before_global_data_positions_resumes_on_any_process_count(tmp_path, corpus):
  # Written as checkpoints were before: Grain's iterator state per process, here by 2 processes, resumed by 1.
  loop.run(quick_run_config(corpus, steps=4), str(tmp_path / "new"))
  shutil.copytree(tmp_path / "new", tmp_path / "legacy")
  step = tmp_path / "legacy" / "checkpoints" / "4"
  shutil.rmtree(step / checkpoint.DATA_POSITION)
  (step / checkpoint.LEGACY_DATA).mkdir()
  for i in range(2):
    (step / checkpoint.LEGACY_DATA / f"process_{i}-of-2.json").write_text(json.dumps({"next_index": 4}))
  resumed = {name: loop.run(quick_run_config(corpus, steps=6), str(tmp_path / name)) for name in ("new", "legacy")}
  assert resumed["legacy"].train_loss == resumed["new"].train_loss
  # A position this version cannot read stops the run with one line and keeps the checkpoint.
  (step / checkpoint.LEGACY_DATA / "process_0-of-2.json").write_text(json.dumps({"cursor": 4}))
  (step / checkpoint.LEGACY_DATA / "process_1-of-2.json").unlink()
  for later in (tmp_path / "legacy" / "checkpoints").iterdir():
    if later.name != "4":
      shutil.rmtree(later)
  with pytest.raises(checkpoint.CheckpointError, match=r"checkpoints/4 holds a data position this version cannot "
                                                        r"read \(unknown data position \{'cursor': 4\}\)"):
    loop.run(quick_run_config(corpus, steps=6), str(tmp_path / "legacy"))
  assert sorted(p.name for p in (tmp_path / "legacy" / "checkpoints").iterdir()) == ["4"]


def test_restore_errors_name_their_cause_and_spike_history_follows_the_setting(tmp_path, corpus):
  loop.run(quick_run_config(corpus, steps=4), str(tmp_path))
  # Another optimizer (gradient clipping off): named as such, the checkpoint kept.
  with pytest.raises(config_lib.ConfigError, match=r"checkpoints/4 holds an optimizer state of another form than this "
                                                   r"config's: opt_state\S* is missing there"):
    loop.run(quick_run_config(corpus, steps=6, grad_clip=0.0), str(tmp_path))
  assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["4"]
  # train.spike_skip turned on for a resume: its history starts empty; turned off again: dropped.
  on = loop.run(quick_run_config(corpus, steps=6, spike_skip=3.0, spike_window=2), str(tmp_path))
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert on.step == 6 and [r["spike_skipped_steps"] for r in rows if "spike_skipped_steps" in r] == [0, 0]  # 5, 6
  assert loop.run(quick_run_config(corpus, steps=8), str(tmp_path)).step == 8


def test_shapes_compare_with_saved_metadata_of_list_entries():
  # Saved metadata names the entries of a list of layers '0', '1', ...; the model's tree indexes them 0, 1, ...
  shape = lambda *s: jax.ShapeDtypeStruct(s, np.float32)
  saved = {"blocks": {"0": {"bias": shape(32)}, "1": {"bias": shape(32)}}, "wte": shape(300, 32)}
  assert train.first_shape_mismatch(saved, {"blocks": [{"bias": shape(32)}, {"bias": shape(32)}],
                                            "wte": shape(300, 32)}) is None
  assert train.first_shape_mismatch(saved, {"blocks": [{"bias": shape(32)}, {"bias": shape(64)}],
                                            "wte": shape(300, 32)}) == ("['blocks'][1]['bias']", (32,), (64,))
  assert train.first_shape_mismatch(saved, {"blocks": [{"bias": shape(32)}] * 3, "wte": shape(300, 32)}) == (
      "['blocks'][2]['bias']", None, (32,))


def test_resume_refuses_a_checkpoint_trained_with_another_tokenizer(tmp_path, corpus):
  loop.run(quick_run_config(corpus, steps=4), str(tmp_path))
  other = quick_run_config(corpus, steps=6)
  other.data.vocab_size = 290
  other.model.vocab_size = 320
  with pytest.raises(ValueError, match="was trained with tokenizer"):
    loop.run(other, str(tmp_path))


@pytest.mark.devices(8)
@pytest.mark.parametrize("target_mesh, n_devices", [((8, 1, 1), 8), ((1, 1, 8), 8), ((2, 2, 1), 4), ((1, 1, 1), 1)])
def test_restore_on_another_mesh(tmp_path, target_mesh, n_devices):
  source_config = tiny_config(mesh=(2, 2, 2))
  graphdef, state, shardings, mesh, tx = build(source_config)
  step = train.make_train_step(graphdef, tx, source_config, shardings, mesh)
  batch = sharding.global_batch(random_tokens((1, 8, 17)), sharding.batch_sharding(mesh, config_lib.DEFAULT_RULES, 3, 1), batch_dim=1)
  state, _ = step(state, batch)
  saved = jax.device_get(state)
  mngr = checkpoint.manager(str(tmp_path), source_config)
  mngr.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
  mngr.wait_until_finished()

  config = tiny_config(mesh=target_mesh)
  target = sharding.make_mesh(config, jax.devices()[:n_devices])
  tx = train.make_optimizer(config)
  graphdef, abstract, new_shardings = train.abstract_state(config, GPTConfig.from_config(config.model, 128),
                                                           target, tx)
  restored = checkpoint.restore(mngr, 1, abstract, new_shardings)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), saved)
  jax.tree.map(lambda a, s: a.sharding.is_equivalent_to(s, a.ndim) or pytest.fail(f"{a.sharding} != {s}"),
               restored, new_shardings)
  new_step = train.make_train_step(graphdef, tx, config, new_shardings, target)
  batch = sharding.global_batch(random_tokens((1, 8, 17), seed=1), sharding.batch_sharding(target, config_lib.DEFAULT_RULES, 3, 1),
                                batch_dim=1)
  after, metrics = new_step(restored, batch)
  assert int(after["step"]) == 2 and np.isfinite(float(metrics["train_loss"]))


def test_export_and_init_from(tmp_path, corpus):
  run = tmp_path / "run"
  loop.run(quick_run_config(corpus, steps=4), str(run))
  loaded = loader.load_model(str(run))
  exported = loader.load_model(loader.export(str(run), str(tmp_path / "export"), dtype="bfloat16"))
  assert loaded.step == exported.step == 4
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a, np.float32).astype(jax.numpy.bfloat16),
                                                          b), loaded.params, exported.params)
  assert exported.tokenizer.fingerprint == loaded.tokenizer.fingerprint
  # init_from starts a fresh run (step 0, new optimizer) from the weights, on new text read with their tokenizer.
  other = tmp_path / "other.txt"
  other.write_text("a different corpus, with words the first one never had: zebra, quartz, jovial.\n" * 400)
  config = quick_run_config(other, steps=1, learning_rate=1e-12, warmup_steps=0)
  config.checkpoint.init_from = str(run)
  fine = tmp_path / "fine"
  loop.run(config, str(fine))
  tuned = loader.load_model(str(fine))
  assert tuned.step == 1 and tuned.tokenizer.fingerprint == loaded.tokenizer.fingerprint
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), tuned.params, loaded.params)


@pytest.mark.parametrize("conditional", [True, False], ids=["conditional", "select"])
def test_nonfinite_skip_leaves_the_state_unchanged(conditional, monkeypatch):
  monkeypatch.setattr(train, "guard_as_conditional", lambda mesh: conditional)  # False: the GPU/TPU form
  config = tiny_config(nonfinite="skip")
  graphdef, state, shardings, mesh, tx = build(config)
  poisoned = jax.tree.map(np.array, jax.device_get(state))
  poisoned["params"]["wte"]["embedding"][0, 0] = np.nan
  poisoned = jax.device_put(poisoned, shardings)
  step = train.make_train_step(graphdef, tx, config, shardings, mesh)
  tokens = random_tokens((1, 8, 17))
  tokens[0, 0, 0] = 0  # the NaN embedding row is read
  before = jax.device_get(poisoned)
  after, metrics = step(poisoned, sharding.global_batch(tokens, sharding.batch_sharding(mesh, config_lib.DEFAULT_RULES, 3, 1), batch_dim=1))
  assert int(metrics["skipped_steps"]) == 1 and int(after["step"]) == 1
  after = jax.device_get(after)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), after["params"], before["params"])
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), after["opt_state"], before["opt_state"])


def test_nonfinite_stop_saves_the_last_good_state(tmp_path, corpus):
  config = quick_run_config(corpus, steps=50, learning_rate=1e12, warmup_steps=0, grad_clip=0.0)
  with pytest.raises(FloatingPointError, match="non-finite loss or gradient at step"):
    loop.run(config, str(tmp_path))
  loaded = loader.load_model(str(tmp_path))
  assert 0 < loaded.step < 50
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(loaded.params))


def test_load_model_errors(tmp_path):
  with pytest.raises(checkpoint.CheckpointError, match="neither a run directory"):
    loader.load_model(str(tmp_path))


def test_async_save_is_not_corrupted_by_the_steps_that_follow(tmp_path):
  """The next steps donate the state's buffers while Orbax still writes them in the background."""
  config = tiny_config(n_layer=4, n_embd=256)
  graphdef, state, shardings, mesh, tx = build(config, vocab=4096)
  step = train.make_train_step(graphdef, tx, config, shardings, mesh)
  batch = sharding.global_batch(random_tokens((1, 8, 17), vocab=4096), sharding.batch_sharding(mesh, config_lib.DEFAULT_RULES, 3, 1), 1)
  state, _ = step(state, batch)
  snapshot = jax.tree.map(lambda x: np.array(x, copy=True), state)
  mngr = checkpoint.manager(str(tmp_path), config)
  mngr.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
  for _ in range(5):
    state, _ = step(state, batch)
  jax.block_until_ready(state)
  mngr.wait_until_finished()
  _, abstract, _ = train.abstract_state(config, GPTConfig.from_config(config.model, 4096), mesh, tx)
  restored = checkpoint.restore(mngr, 1, abstract, shardings)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), snapshot)


def test_keeps_the_latest_and_the_best_by_validation_loss(tmp_path):
  config = tiny_config()
  config.checkpoint.update(keep=1, keep_best=1)
  mngr = checkpoint.manager(str(tmp_path), config)
  state = {"w": np.zeros(3, np.float32)}
  for step, val_loss in zip([1, 2, 3, 4], [3.0, 1.0, 2.0, None]):
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
              metrics=None if val_loss is None else {"val_loss": val_loss})
    mngr.wait_until_finished()
  assert mngr.all_steps() == [2, 4]
