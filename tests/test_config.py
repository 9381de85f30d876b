"""Config loading: command-line overrides and the one-sentence errors for bad ones."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from t5x_like.core import config as config_lib
from t5x_like.core.errors import UserError


def run_train(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "t5x_like.train", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("override, expected", [
    ("--config.stepz=5", "unknown config key 'stepz' in --config.stepz=5. Did you mean 'steps'?"),
    ("--config.model.hiden_dim=64", "unknown config key 'model.hiden_dim'"),
    ("--config.modle.hidden_dim=64", "Did you mean 'model'?"),
    ("--config.model.hidden_dim=abc", "config key 'model.hidden_dim' expects an integer, got 'abc'."),
    ("--config.steps=abc", "config key 'steps' expects an integer, got 'abc'."),
    ("--config.optimizer.lr=fast", "config key 'optimizer.lr' expects a number, got 'fast'."),
    ("--config.model.scan_layers=maybe", "config key 'model.scan_layers' expects true or false"),
    ("--config.model.num_kv_heads=3", "config key 'model.num_kv_heads': 3 must divide"),
    ("--config.mesh.fsdp=-1", "at most one axis may be -1"),
    ("--config.model.attention_impl=flash",
     "config key 'model.attention_impl': is 'flash'; choose one of einsum, dot_product_attention, "
     "chunked."),
    ("--config.data.source=csv:x.csv", "config key 'data.source': 'csv:x.csv' is not a data source"),
    ("--config.data.source=text:/nonexistent/*.txt", "no file matches '/nonexistent/*.txt'"),
])
def test_bad_override_is_one_clear_line(tmp_path, override, expected):
    result = run_train("--config=configs/pretrain_tiny.py", f"--workdir={tmp_path}/run", override)
    assert result.returncode == 2, result.stderr[-2000:]
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1
    assert not os.path.exists(tmp_path / "run" / "checkpoints")  # failed before any compute


def test_missing_and_broken_config_files(tmp_path):
    result = run_train("--config=configs/nope.py", f"--workdir={tmp_path}")
    assert result.returncode == 2 and "cannot load --config=configs/nope.py" in result.stderr
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(:\n")
    result = run_train(f"--config={broken}", f"--workdir={tmp_path}")
    assert result.returncode == 2 and "SyntaxError" in result.stderr


def test_recipe_imports_base_from_any_working_directory(tmp_path):
    # A recipe does `from configs import base`; starting the job elsewhere must still work.
    result = run_train(f"--config={ROOT}/configs/pretrain_tiny.py", f"--workdir={tmp_path}/r",
                       "--config.model.num_heads=3", cwd=tmp_path)
    assert result.returncode == 2
    assert "config key 'model.num_kv_heads': 2 must divide model.num_heads (3)" in result.stderr


def test_overrides_reach_the_config(tmp_path):
    # In a fresh interpreter, as entry points parse: our parser over absl's global flags.
    script = (
        "import sys\n"
        "from ml_collections import config_flags\n"
        "from absl import flags\n"
        "from t5x_like.core import cli\n"
        "config_flags.DEFINE_config_file('config')\n"
        "cli.parse_flags(sys.argv)\n"
        "c = flags.FLAGS.config\n"
        "print(c.optimizer.lr, c.model.num_layers, c.data.source, c.model.hidden_dim)\n")
    result = subprocess.run(
        [sys.executable, "-c", script, f"--config={ROOT}/configs/pretrain_tiny.py",
         "--config.optimizer.lr=1e-4", "--config.model.num_layers=6",
         "--config.data.source=text:a.txt"], capture_output=True, text=True, cwd=tmp_path)
    assert result.stdout.split() == ["0.0001", "6", "text:a.txt", "128"], result.stderr


def test_validate_names_the_key(tiny_cfg):
    config_lib.validate(tiny_cfg)
    tiny_cfg.optimizer.grad_accum_steps = 3
    with pytest.raises(UserError, match="optimizer.grad_accum_steps.*3 must divide data.batch_size"):
        config_lib.validate(tiny_cfg)
    tiny_cfg.optimizer.grad_accum_steps = 1
    tiny_cfg.dpo.rpo_alpha = -1.0
    with pytest.raises(UserError, match="config key 'dpo.rpo_alpha': is -1.0; it must be >= 0"):
        config_lib.validate(tiny_cfg)


def test_resolve_derives_vocab_and_freezes(tiny_cfg):
    resolved = config_lib.resolve(tiny_cfg, tokenizer_vocab=300)
    assert resolved.model.vocab_size == 384 and resolved.model.head_dim == 8
    with pytest.raises(AttributeError):
        resolved.model.vocab_size = 1
    tiny_cfg.model.vocab_size = 100
    with pytest.raises(UserError, match="model.vocab_size.*smaller than the tokenizer"):
        config_lib.resolve(tiny_cfg, tokenizer_vocab=300)


def test_config_json_round_trip(tiny_cfg, tmp_path):
    resolved = config_lib.resolve(tiny_cfg, 300)
    config_lib.save_json(resolved, str(tmp_path / "config.json"))
    back = config_lib.load_json(str(tmp_path / "config.json"))
    assert config_lib.to_dict(back) == config_lib.to_dict(resolved)
    # An older run's config.json, written before keys were added, reads with their defaults.
    old = config_lib.to_dict(resolved)
    del old["dpo"]["rpo_alpha"], old["model"]["attention_block"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    back = config_lib.load_json(str(tmp_path / "old.json"))
    assert back.dpo.rpo_alpha == 0.0 and back.model.attention_block == 128
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="bad.json is not valid JSON"):
        config_lib.load_json(str(tmp_path / "bad.json"))


def test_a_typo_inside_a_recipe_stops_at_its_line(tmp_path):
    # configs/base.py locks its config: a recipe assigning an unknown key fails on that line.
    recipe = tmp_path / "typo.py"
    recipe.write_text("from configs import base\n\n\ndef get_config():\n"
                      "    cfg = base.get_config()\n    cfg.model.num_layrs = 3\n    return cfg\n")
    result = run_train(f"--config={recipe}", f"--workdir={tmp_path}/run")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: {recipe}:6: unknown config key 'model.num_layrs' in `cfg.model.num_layrs = 3`; "
        "did you mean 'model.num_layers'?")
    assert not os.path.exists(tmp_path / "run")  # nothing written, nothing computed


def test_base_config_is_locked_except_data_sources():
    from configs import base

    cfg = base.get_config()
    with pytest.raises(AttributeError, match='Did you mean "model"'):
        cfg.modle = 3
    cfg.data.sources.mine = {"source": "synthetic:arithmetic", "weight": 1.0}  # open on purpose


def _recipes():
    for folder, _, files in os.walk(os.path.join(ROOT, "configs")):
        for name in sorted(files):
            if name.endswith(".py") and name != "__init__.py":
                yield os.path.relpath(os.path.join(folder, name), ROOT)


@pytest.mark.parametrize("path", sorted(_recipes()))
def test_every_recipe_loads_and_training_recipes_validate(path, monkeypatch):
    import runpy

    monkeypatch.chdir(ROOT)  # recipes name data relative to the repository (../shared/data)
    module = runpy.run_path(path)
    if "get_config" not in module:
        return  # a helper module (common.py): its constructors are used by the recipes
    cfg = module["get_config"]()
    if "model" in cfg and "task" in cfg:  # a training recipe, derived from configs/base.py
        assert cfg.is_locked, f"{path} unlocked the base config"
        config_lib.validate(cfg)
    elif path.startswith("configs/eval/"):
        from t5x_like.evaluation import eval_suite

        eval_suite.validate(cfg)
    elif path.startswith("configs/sweeps/"):
        from t5x_like.experiments import sweep_config

        sweep_config.validate(cfg)
        sweep_config.check_against_job(cfg)  # its fixed and swept keys exist in the job's recipe


def _saved(tiny_cfg, **changes):
    saved = config_lib.resolve(tiny_cfg, 300)
    now = tiny_cfg.copy_and_resolve_references()
    for key, value in changes.items():
        section, _, leaf = key.rpartition(".")
        (now[section] if section else now)[leaf] = value
    return saved, now


def test_resume_may_change_steps_eval_and_mesh_only(tiny_cfg):
    saved, now = _saved(tiny_cfg, **{"steps": 100, "eval.steps": 7, "mesh.data": 2,
                                     "checkpoint.every_steps": 9, "model.remat": "full"})
    config_lib.check_resume(saved, now)  # vocab_size/head_dim 0 now: derived, not a change
    saved, now = _saved(tiny_cfg, **{"data.batch_size": 16})
    with pytest.raises(UserError) as e:
        config_lib.check_resume(saved, now)
    assert str(e.value) == (
        "config key 'data.batch_size' is 16 but this workdir's checkpoints were trained with 8 "
        "(its config.json); use a new --workdir, or pass --allow_config_change=data.batch_size "
        "to resume with the change.")
    config_lib.check_resume(saved, now, allow_changes=["data.batch_size"])
    saved, now = _saved(tiny_cfg, **{"data.source": "text:README.md", "optimizer.lr": 0.1})
    with pytest.raises(UserError, match="config key 'data.source' is 'text:README.md' but .* "
                       "'synthetic:arithmetic'.*also changed: optimizer.lr"):
        config_lib.check_resume(saved, now)
    saved, now = _saved(tiny_cfg, **{"model.num_layers": 3})
    with pytest.raises(UserError, match="model.num_layers: 2 in this workdir's checkpoints, 3"):
        config_lib.check_resume(saved, now, allow_changes=["model"])  # parameters cannot change
