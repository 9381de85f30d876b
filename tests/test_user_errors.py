"""A new user's mistakes outside training (issue 22): sampling flags, prompts longer than the
model's context, the shapes numbers take in the log, JAX's start-up chatter."""

import errno
import logging
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from t5x_like import sample
from t5x_like.core import cli
from t5x_like.core import metrics
from t5x_like.core.errors import UserError


@pytest.mark.parametrize("flags, expected", [
    (dict(temperature=-1.0), "--temperature=-1.0 must be >= 0 (0 = greedy)."),
    (dict(top_p=2.0), "--top_p=2.0 must be in (0, 1] (1 = off)."),
    (dict(top_p=0.0), "--top_p=0.0 must be in (0, 1] (1 = off)."),
    (dict(top_k=-3), "--top_k=-3 must be >= 0 (0 = off)."),
    (dict(max_new_tokens=0), "--max_new_tokens=0 must be at least 1."),
    (dict(num_samples=0), "--num_samples=0 must be at least 1."),
])
def test_sampling_flags_are_checked(flags, expected):
    values = dict(temperature=0.7, top_p=0.9, top_k=0, max_new_tokens=16, num_samples=1)
    cli.check_sampling_flags(**values)  # good values pass
    with pytest.raises(UserError) as e:
        cli.check_sampling_flags(**{**values, **flags})
    assert str(e.value) == expected


def test_sample_cli_refuses_bad_sampling_flags_before_loading(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "t5x_like.sample", f"--workdir={tmp_path}/none", "--top_p=2"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --top_p=2.0 must be in (0, 1] (1 = off)."


def test_a_prompt_longer_than_the_context_is_refused_or_cut_loudly(caplog):
    long = list(range(10, 7010))  # 7,000 tokens for a 128-token model
    with pytest.raises(UserError) as e:
        sample.fit_prompt(long, 1, 128, 100)
    assert str(e.value) == ("the prompt has 7,000 tokens but the model's context (model.max_len) "
                            "is 128; shorten it, or pass --truncate_prompt to keep its last 27 "
                            "tokens.")
    with caplog.at_level(logging.WARNING):
        prompt, new = sample.fit_prompt(long, 1, 128, 100, truncate=True)
    assert prompt == [1, *long[-27:]] and new == 100 and len(prompt) + new == 128
    assert "Prompt truncated to its last 27 of 7000 tokens" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # fits, but the reply would run past the context
        prompt, new = sample.fit_prompt(long[:100], 1, 128, 100)
    assert len(prompt) == 101 and new == 27 and "Generating at most 27 tokens" in caplog.text
    assert sample.fit_prompt([5, 6], 1, 128, 100) == ([1, 5, 6], 100)
    with pytest.raises(UserError, match="--max_new_tokens=128 leaves no room for a prompt"):
        sample.fit_prompt([5], 1, 128, 128)


@pytest.mark.parametrize("value, shown", [
    (16903.0, "16903"), (16903.42, "16903"), (2.34567, "2.346"), (0.0003, "0.0003"),
    (3e-5, "3e-05"), (0.5, "0.5"), (float("nan"), "nan"), (7, "7"), (1234.5, "1234")])
def test_log_numbers(value, shown):
    assert metrics.format_value(value) == shown


def test_the_tpu_probe_line_is_filtered():
    from absl import logging as absl_logging

    probe = logging.LogRecord("jax._src.xla_bridge", logging.INFO, "xla_bridge.py", 1,
                              "Unable to initialize backend '%s': %s", ("tpu", "no libtpu"), None)
    warning = logging.LogRecord("jax._src.xla_bridge", logging.WARNING, "xla_bridge.py", 1,
                                "Unable to initialize backend '%s': %s", ("tpu", "x"), None)
    keep = cli._BackendProbeFilter().filter
    assert not keep(probe) and keep(warning)
    old = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.DEBUG)  # --verbosity=1 shows everything
    try:
        assert keep(probe)
    finally:
        absl_logging.set_verbosity(old)


@pytest.mark.parametrize("code, exit_code", [(errno.ENOSPC, 1), (errno.ENOENT, None)])
def test_a_full_disk_anywhere_is_one_line_and_exit_1(tmp_path, code, exit_code):
    # Writes outside the checkpointer (metrics.jsonl, config.json, reports) fail as OSError;
    # the entry point turns disk-full / read-only ones into one line, other OSErrors stay bugs.
    script = tmp_path / "job.py"
    script.write_text(
        "import errno, os\n"
        "from t5x_like.core import cli\n"
        "def main(argv):\n"
        f"    raise OSError({code}, os.strerror({code}), '/runs/x/metrics.jsonl')\n"
        "cli.run(main)\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    if exit_code is None:
        assert proc.returncode == 1 and "Traceback" in proc.stderr
        return
    assert proc.returncode == exit_code
    assert proc.stderr.strip().splitlines() == [
        "error: cannot write /runs/x/metrics.jsonl: No space left on device; free some space "
        "(or fix the folder's permissions) and rerun the same command."]
