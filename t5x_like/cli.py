"""What every entry point shares: flag parsing with readable errors, and `run(main)`.

`run(main)` wraps `absl.app.run`: a bad `--config` file or override, or any `UserError` raised
while the job runs, ends with one line on stderr and exit status 2, never a traceback.
"""

import difflib
import logging as std_logging
import os
import runpy
import sys
from typing import Callable

from absl import app, flags, logging

from t5x_like.errors import UserError


def _put_config_package_on_path(argv: list[str]) -> None:
    """Lets recipe files `from configs import base` wherever the job is started from."""
    for arg in argv:
        if arg.startswith("--config="):
            folder = os.path.dirname(os.path.abspath(arg.split("=", 1)[1]))
            while os.path.isfile(os.path.join(folder, "__init__.py")):
                folder = os.path.dirname(folder)
            if folder not in sys.path:
                sys.path.insert(0, folder)


def _unknown_override(argv: list[str], error: Exception) -> str:
    """Names the `--config.a.b=v` override whose key does not exist, with the closest key."""
    config_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    try:
        cfg = runpy.run_path(config_arg.split(":", 1)[0])["get_config"]()
    except Exception:  # the config itself is broken: absl's own message is all we have
        return f"bad config override: {error}"
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        node, path = cfg, []
        for part in arg[len("--config."):].split("=", 1)[0].split("."):
            keys = list(node.keys()) if hasattr(node, "keys") else []
            if part not in keys:
                close = difflib.get_close_matches(part, keys, n=1)
                where = ".".join(path + [part])
                hint = f" Did you mean '{'.'.join(path + close)}'?" if close else ""
                return f"unknown config key '{where}' in {arg}.{hint} See README.md, 'Config keys'."
            node, path = node[part], path + [part]
    return f"bad config override: {error}"


def parse_flags(argv: list[str]) -> list[str]:
    """absl flags parser turning config-loading failures into one UserError sentence."""
    _put_config_package_on_path(argv)
    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:
        raise UserError(f"{e}") from None
    except (AttributeError, KeyError) as e:  # ml_collections: override of a key that is absent
        raise UserError(_unknown_override(argv, e)) from None
    except Exception as e:  # the config file itself fails to import (SyntaxError, NameError...)
        config_arg = next((a for a in argv if a.startswith("--config=")), "--config")
        raise UserError(f"cannot load {config_arg}: {type(e).__name__}: {e}") from None
    if "config" in flags.FLAGS:
        if not flags.FLAGS["config"].present:  # before config_filename, which raises then
            raise UserError("--config is required: a config file (configs/*.py; see README.md).")
        config_file = flags.FLAGS["config"].config_filename if hasattr(
            flags.FLAGS["config"], "config_filename") else None
        try:
            flags.FLAGS.config.keys()
        except IOError as e:
            cause = e.__cause__ or e
            raise UserError(f"cannot load --config={config_file}: "
                            f"{type(cause).__name__}: {cause}") from None
    return rest


_QUIET_LIBRARIES = ("/orbax/", "/grain/", "/tensorflow_datasets/", "/etils/")


class _LibraryInfoFilter(std_logging.Filter):
    """Drops INFO chatter of Orbax, grain and TFDS (dozens of lines per checkpoint); keeps
    their warnings and errors. `--verbosity=1` shows everything again."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        if record.levelno > std_logging.INFO or logging.get_verbosity() > logging.INFO:
            return True
        return not any(part in record.pathname for part in _QUIET_LIBRARIES)


def run(main: Callable[[list[str]], None]) -> None:
    """`absl.app.run(main)` that reports UserError as one line and exits with status 2 (1 for
    an EnvironmentFailure)."""
    std_logging.getLogger("absl").addFilter(_LibraryInfoFilter())

    def flags_parser(argv):
        try:
            return parse_flags(argv)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    def guarded(argv):
        try:
            main(argv)
        except UserError as e:
            logging.flush()
            print(f"error: {e}", file=sys.stderr)
            sys.exit(e.exit_code)  # 2, or 1 for an EnvironmentFailure (a full disk...)

    app.run(guarded, flags_parser=flags_parser)
