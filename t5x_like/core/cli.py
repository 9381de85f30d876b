"""What every entry point shares: flag parsing with readable errors, `run(main)`, and
`run_command` for the jobs with sub-commands (`evaluate compare`, `hf import`, `feedback export`).

`run(main)` wraps `absl.app.run`: a bad `--config` file or override, or any `UserError` raised
while the job runs, ends with one line on stderr and exit status 2, never a traceback.
"""

import dataclasses
import difflib
import logging as std_logging
import os
import runpy
import sys
import sysconfig
import traceback
from typing import Callable

from absl import app, flags, logging

from t5x_like.core import errors
from t5x_like.core.errors import UserError


def put_config_package_on_path(argv: list[str]) -> None:
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


def _recipe_frame(error: BaseException) -> traceback.FrameSummary | None:
    """The innermost frame of `error`'s traceback in a config recipe: a file that is neither
    Python's own, an installed library's, nor this package's."""
    libraries = {sysconfig.get_paths()[k] for k in ("stdlib", "purelib", "platlib")}
    libraries.add(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # t5x_like/
    recipe = None
    for frame in traceback.extract_tb(error.__traceback__):
        path = os.path.abspath(frame.filename)
        if frame.filename.startswith("<") or any(path.startswith(d + os.sep) for d in libraries):
            continue
        recipe = frame
    return recipe


def _where(frame: traceback.FrameSummary) -> str:
    path = os.path.relpath(frame.filename) if not os.path.relpath(
        frame.filename).startswith("..") else frame.filename
    return f"{path}:{frame.lineno}"


def _recipe_key_error(error: Exception) -> str | None:
    """A recipe line assigning (or reading) a key the locked base config lacks, as one sentence
    naming the file, line, key and the closest key; None if `error` is not that."""
    import re

    frame = _recipe_frame(error)
    missing = re.search(r'Key "([^"]+)" does not exist', str(error))
    if frame is None or missing is None:
        return None
    leaf = missing.group(1)
    close = re.search(r'Did you mean "([^"]+)"', str(error))
    source = (frame.line or "").strip()
    # `cfg.model.num_layrs = 3` -> model.num_layrs: the path after the recipe's variable.
    chain = re.search(r"\b\w+((?:\.\w+)*)\." + re.escape(leaf) + r"\b", source)
    prefix = chain.group(1)[1:] + "." if chain and chain.group(1) else ""
    hint = (f"; did you mean '{prefix}{close.group(1)}'?" if close
            else " (README.md, 'Config keys', lists them).")
    return f"{_where(frame)}: unknown config key '{prefix}{leaf}' in `{source}`{hint}"


_FLAG_TYPES = (("invalid literal for int()", "an integer"),
               ("could not convert string to float", "a number"),
               ("Non-boolean argument", "true or false"))


def _bad_value(error: flags.Error) -> str:
    """`flag --config.steps=abc: invalid literal for int()...` -> "config key 'steps' expects
    an integer, got 'abc'"; other flag errors as absl words them."""
    import re

    text = str(error)
    match = re.match(r"flag --config\.([\w.]+)=(.*?): (.*)$", text, re.S)
    if match:
        for cause, expected in _FLAG_TYPES:
            if cause in match.group(3):
                return (f"config key '{match.group(1)}' expects {expected}, got "
                        f"{match.group(2)!r}.")
    return text


def parse_flags(argv: list[str]) -> list[str]:
    """absl flags parser turning config-loading failures into one UserError sentence."""
    put_config_package_on_path(argv)
    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:
        raise UserError(_bad_value(e)) from None
    except (AttributeError, KeyError) as e:  # a recipe line or an override naming an absent key
        raise UserError(_recipe_key_error(e) or _unknown_override(argv, e)) from None
    except Exception as e:  # the config file itself fails to import (SyntaxError, NameError...)
        config_arg = next((a for a in argv if a.startswith("--config=")), "--config")
        frame = _recipe_frame(e)
        where = f" ({_where(frame)})" if frame is not None else ""
        raise UserError(f"cannot load {config_arg}{where}: {type(e).__name__}: {e}") from None
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


def define_sampling_flags(*, max_new_tokens: int, temperature: float = 0.0,
                          max_new_tokens_help: str = "Tokens to generate.",
                          seed_help: str = "Sampling seed.") -> None:
    """--max_new_tokens, --temperature, --top_k, --top_p and --seed, as sample, chat and
    `evaluate compare` take them (check_sampling_flags checks them)."""
    flags.DEFINE_integer("max_new_tokens", max_new_tokens, max_new_tokens_help)
    flags.DEFINE_float("temperature", temperature, "0 = greedy.")
    flags.DEFINE_integer("top_k", 0, "Sample only among the k likeliest tokens; 0 = all.")
    flags.DEFINE_float("top_p", 1.0, "Sample from the smallest set with this much probability.")
    flags.DEFINE_integer("seed", 0, seed_help)


def check_sampling_flags(*, temperature: float, top_p: float, top_k: int, max_new_tokens: int,
                         num_samples: int = 1) -> None:
    """The sampling flags of sample and chat, one sentence for the first bad one (serve checks
    the same ranges per request)."""
    for ok, text in (
            (temperature >= 0, f"--temperature={temperature} must be >= 0 (0 = greedy)."),
            (0 < top_p <= 1, f"--top_p={top_p} must be in (0, 1] (1 = off)."),
            (top_k >= 0, f"--top_k={top_k} must be >= 0 (0 = off)."),
            (max_new_tokens > 0, f"--max_new_tokens={max_new_tokens} must be at least 1."),
            (num_samples > 0, f"--num_samples={num_samples} must be at least 1.")):
        if not ok:
            raise UserError(text)


_QUIET_LIBRARIES = ("/orbax/", "/grain/", "/tensorflow_datasets/", "/etils/")


class _LibraryInfoFilter(std_logging.Filter):
    """Drops INFO chatter of Orbax, grain and TFDS (dozens of lines per checkpoint); keeps
    their warnings and errors. `--verbosity=1` shows everything again."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        if record.levelno > std_logging.INFO or logging.get_verbosity() > logging.INFO:
            return True
        return not any(part in record.pathname for part in _QUIET_LIBRARIES)


class _BackendProbeFilter(std_logging.Filter):
    """JAX tries every platform at start-up and logs each one it cannot open ("Unable to
    initialize backend 'tpu'") at INFO: harmless on every machine without that accelerator, yet
    every command printed it. Its warnings and errors stay, and `--verbosity=1` shows it."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        if record.levelno > std_logging.INFO or logging.get_verbosity() > logging.INFO:
            return True
        return not str(record.msg).startswith("Unable to initialize backend")



def run(main: Callable[[list[str]], None], argv: list[str] | None = None) -> None:
    """`absl.app.run(main)` that reports UserError as one line and exits with status 2 (1 for
    an EnvironmentFailure). `argv`: the command line (default sys.argv)."""
    std_logging.getLogger("absl").addFilter(_LibraryInfoFilter())
    std_logging.getLogger("jax._src.xla_bridge").addFilter(_BackendProbeFilter())

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
        except OSError as e:
            if e.errno not in errors.ENVIRONMENT_ERRNOS:
                raise
            # Any other write (metrics.jsonl, config.json, a report) on a full or read-only
            # disk: the command was right, the machine was not; one line, not a traceback.
            logging.flush()
            where = f" {e.filename}" if e.filename else ""
            print(f"error: cannot write{where}: {e.strerror}; free some space (or fix the "
                  "folder's permissions) and rerun the same command.", file=sys.stderr)
            sys.exit(1)

    app.run(guarded, argv=argv, flags_parser=flags_parser)


@dataclasses.dataclass(frozen=True)
class Command:
    """One sub-command of an entry point: `python -m <module> <name> [args] --flags`.

    main gets [program, *positional args] (the command's name taken out), as `run`'s does.
    """

    main: Callable[[list[str]], None]
    define_flags: Callable[[], None] = lambda: None  # this command's flags, defined only for it
    usage: str = ""  # what follows the name on the command line: "RUN_A RUN_B --prompts=FILE"
    args: tuple[int, int | None] = (0, 0)  # positional arguments it takes: (min, max or None)
    required: tuple[str, ...] = ()  # flags it cannot do without


def run_command(module: str, commands: dict[str, Command], *, default: Command | None = None,
                argv: list[str] | None = None) -> None:
    """`python -m <module> <command> ...`: takes the command from the first argument (`default`
    runs when the first argument is a flag or there is none), defines that command's flags
    alone, checks its positional arguments and required flags, and runs it through `run`.

    An unknown command, like every other mistake on the command line, is one `error:` line
    naming what to type instead, and exit status 2.
    """
    argv = list(sys.argv if argv is None else argv)
    first = argv[1] if len(argv) > 1 else ""
    lines = [f"python -m {module} {name} {c.usage}".rstrip() for name, c in commands.items()]
    if default is not None:
        lines.insert(0, f"python -m {module} {default.usage}".rstrip())
    if first in commands:
        name, command, argv = first, commands[first], [argv[0]] + argv[2:]
    elif default is not None and not first[:1].isalnum():
        name, command = "", default
    else:
        if first.startswith("-") and {"--help", "-h", "--helpshort"} & set(argv):
            print("usage:\n  " + "\n  ".join(lines))
            sys.exit(0)
        what = f"unknown command {first}" if first and not first.startswith("-") else (
            "no command given")
        print(f"error: {what}; use one of {', '.join(commands)}: {' | '.join(lines)}",
              file=sys.stderr)
        sys.exit(2)
    command.define_flags()
    line = f"python -m {module} {name} {command.usage}".replace("  ", " ").rstrip()

    def checked(args: list[str]) -> None:
        low, high = command.args
        given = len(args) - 1
        if given < low or (high is not None and given > high):
            got = f"{given} ({' '.join(args[1:])})" if given else "none"
            raise UserError(f"{name or module} takes {_count(low, high)}, got {got}: {line}")
        missing = [f"--{f}" for f in command.required if flags.FLAGS[f].value in (None, "")]
        if missing:
            raise UserError(f"{name or module} needs {' and '.join(missing)}: {line}")
        command.main(args)

    run(checked, argv)


def _count(low: int, high: int | None) -> str:
    """How many positional arguments, in words: "no positional arguments", "at least 1 ..."."""
    many = "no" if high == 0 else (f"at least {low}" if high is None else
                                   str(low) if low == high else f"{low} to {high}")
    return f"{many} positional argument{'' if many.endswith(' 1') or many == '1' else 's'}"
