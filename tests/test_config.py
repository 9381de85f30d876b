"""Config loading: command-line overrides and the one-sentence errors for bad ones."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from t5x_like import config as config_lib
from t5x_like.errors import UserError


def run_train(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "t5x_like.train", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("override, expected", [
    ("--config.stepz=5", "unknown config key 'stepz' in --config.stepz=5. Did you mean 'steps'?"),
    ("--config.model.hiden_dim=64", "unknown config key 'model.hiden_dim'"),
    ("--config.modle.hidden_dim=64", "Did you mean 'model'?"),
    ("--config.model.hidden_dim=abc", "--config.model.hidden_dim=abc: invalid literal for int()"),
    ("--config.model.scan_layers=maybe", "Non-boolean argument"),
    ("--config.model.num_kv_heads=3", "config key 'model.num_kv_heads': 3 must divide"),
    ("--config.mesh.fsdp=-1", "at most one axis may be -1"),
    ("--config.model.attention_impl=flash", "config key 'model.attention_impl': is 'flash'; "
                                             "choose one of einsum, dot_product_attention."),
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
        "from t5x_like import cli\n"
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
