"""The ``rlhf`` command line: argument parsing over the Python API (:mod:`rlhf.api`) and the commands.

Every recipe has a ``Config`` dataclass in :mod:`rlhf.recipes.configs` (its field docstrings are the
``--help``; nothing there imports torch, so ``rlhf grpo --help`` is as quick as ``rlhf --help``); the
flags and ``--config`` YAML become one, and :func:`rlhf.api.train` runs it, as ``rlhf.sft(...)`` does. User errors print one line and exit non-zero; Ctrl-C exits 130
and SIGTERM 143, each with one line.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import importlib.util
import signal
import sys

from rlhf.recipes import STAGES, config_module

RECIPES = STAGES  # sft, rm, ppo, dpo, grpo, distill: the Python API's stages
TOOLS = {
    "generate": ("rlhf.commands.inference", "Sample completions from a model (seed 002 Part 8)."),
    "chat": ("rlhf.commands.inference", "Interactive terminal chat with a model."),
    "explain": ("rlhf.commands.explain", "Print the seeds' Part 5 table for one real rollout."),
    "report": ("rlhf.watch.report", "An HTML report of a run: curves, monitor signals and warnings, samples."),
    "demo": ("rlhf.demo.run", "The built-in SupportBot pipeline: tokenizer, SFT, RM, PPO, DPO, report."),
    "demo-calculator": ("rlhf.demo.calculator", "The built-in multi-turn example: a tiny model learns by GRPO on "
                                                "episodes to call a calculator tool."),
    "demo-distill": ("rlhf.demo.distill", "The built-in distillation example: a counting teacher by SFT, distilled "
                                          "on-policy into a smaller untrained student."),
}


TRL_EPILOG = ("TRL and transformers names work too, as flags and as --config keys: --learning_rate, "
              "--per_device_train_batch_size (x the number of processes: --batch-size is global), "
              "--model_name_or_path, --dataset_name, --num_train_epochs, --logging_steps, ... and every flag "
              "above with underscores (--max_new_tokens); README, 'TRL's names', has the table.")


class _Parser(argparse.ArgumentParser):
    """argparse without prefix matching (--lr-sched is not silently --lr-scheduler), whose
    errors are one line: ``rlhf sft: error: ...``, exit 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _user_errors():
    from rlhf.errors import UserError

    return (UserError, FileNotFoundError)


def _data_parser(sub) -> None:
    p = sub.add_parser("data", help="Dataset tools.")
    dsub = p.add_subparsers(dest="data_command", required=True)
    c = dsub.add_parser("check", help="Validate a dataset and summarise it; exit 1 if any record is bad.")
    c.add_argument("file", help="JSONL, JSON, CSV or Parquet file, a saved datasets directory, or hf:NAME")
    c.add_argument("--kind", required=True, choices=["sft", "preference", "prompt"], help="What the records hold.")
    c.add_argument("--model", help="Model or tokenizer directory, for token lengths.")
    c.add_argument("--max-length", type=int, default=1024, help="Maximum tokens of prompt + response.")
    c.add_argument("--max-prompt-length", type=int, default=None, help="Prompts longer than this are cut from the left.")
    c.add_argument("--show-labels", action="store_true",
                   help="SFT: print the example with the tokens the loss trains in [[ ]] (needs --model).")


def _run_data(args) -> int:
    from rlhf.data.check import check_file

    tokenizer = None
    if args.model:
        from rlhf.models.loading import load_tokenizer

        tokenizer = load_tokenizer(args.model)
    ok, report = check_file(args.file, args.kind, tokenizer, args.max_length, args.max_prompt_length, args.show_labels)
    print(report)
    return 0 if ok else 1


def _options_module(command: str) -> str:
    """The module whose ``Config`` (or ``add_arguments``) makes ``command``'s flags: a recipe's config
    module (no torch), or the tool's own."""
    return config_module(command) if command in RECIPES else TOOLS[command][0]


def _add_recipe_arguments(p: argparse.ArgumentParser, name: str) -> None:
    from rlhf.training.options import add_arguments

    mod = importlib.import_module(_options_module(name))
    if name in TOOLS:  # a recipe's description is its line in STAGES
        p.description = (mod.__doc__ or "").strip().splitlines()[0] if mod.__doc__ else None
    if hasattr(mod, "Config"):
        if "output_dir" in {f.name for f in __import__("dataclasses").fields(mod.Config)}:
            p.epilog = TRL_EPILOG
        p.add_argument("--config", dest="config_file", help="YAML file of field: value (flags override it).")
        p.add_argument("--print-config", action="store_true", help="Print the resolved config and exit.")
        add_arguments(p, mod.Config)
    elif hasattr(mod, "add_arguments"):
        mod.add_arguments(p, name)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; only ``command``'s module is imported (``rlhf --help`` stays fast)."""
    from rlhf import __version__

    parser = _Parser(prog="rlhf", description="RLHF: SFT, reward model, PPO, DPO, GRPO/RLOO.")
    parser.add_argument("--version", action="version", version=f"rlhf {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in {**RECIPES, **TOOLS}.items():
        if importlib.util.find_spec(module) is None:  # not built yet
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            _add_recipe_arguments(p, name)
            parser.command_parser = p
    _data_parser(sub)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a scheduler's time limit): ends the run as Ctrl-C does."""


def _terminate(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """While a command runs, SIGTERM raises :class:`Terminated` (a ``KeyboardInterrupt``)."""
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def _bool_values(argv: list[str], bools: set[str]) -> list[str]:
    """TRL's spelling of a bool flag with a value (``--bf16 false``, ``--packing=True``) as
    argparse's ``--no-bf16`` / ``--packing``."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in bools:
            if not eq and i + 1 < len(argv) and argv[i + 1].lower() in _TRUE + _FALSE:
                value, eq, i = argv[i + 1], "=", i + 1
            if eq and value.lower() in _TRUE:
                arg = name
            elif eq and value.lower() in _FALSE:
                arg = "--no-" + name[2:]
        out.append(arg)
        i += 1
    return out


def _unknown(parser: argparse.ArgumentParser, command: str, extras: list[str]) -> str:
    """One line about the first argument nobody took, naming the closest flag we have."""
    from rlhf.training.options import unknown_name

    first = next((a for a in extras if a.startswith("-")), None)
    if first is None:
        return f"unexpected argument {extras[0]!r}"
    mod = importlib.import_module(_options_module(command)) if command in {**RECIPES, **TOOLS} else None
    if mod is not None and hasattr(mod, "Config"):
        return unknown_name(mod.Config, first, command)
    sub = getattr(parser, "command_parser", parser)
    options = [o for a in sub._actions for o in a.option_strings if o.startswith("--")]
    close = difflib.get_close_matches(first.split("=", 1)[0], options, n=1, cutoff=0.75)
    return f"unknown flag {first.split('=', 1)[0]}" + (f"; did you mean {close[0]}?" if close else "")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command)
    if hasattr(parser, "command_parser"):  # a recipe or tool: its options module is imported already
        mod = importlib.import_module(_options_module(command))
        if hasattr(mod, "Config"):
            from rlhf.training.options import bool_flags

            argv = _bool_values(argv, bool_flags(mod.Config))
    try:
        args, extras = parser.parse_known_args(argv)
    except SystemExit as e:  # --help, --version, or argparse's one-line error (exit 2)
        return e.code if isinstance(e.code, int) else 2
    if extras:
        print(f"rlhf {args.command}: error: {_unknown(parser, args.command, extras)}", file=sys.stderr)
        return 2
    with _sigterm_as_interrupt():
        return _main(args)


def _main(args) -> int:
    try:
        if args.command == "data":
            return _run_data(args)
        module = importlib.import_module(_options_module(args.command))
        if not hasattr(module, "Config"):
            return int(module.main(args, args.command) or 0)
        from rlhf.training.options import build_config, to_yaml

        cls = module.Config
        flags = {k: v for k, v in vars(args).items() if k not in ("command", "config_file", "print_config")}
        cfg = build_config(cls, args.config_file, flags)
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        if args.command not in RECIPES:  # a tool with a config of its own (the demo)
            module.run(cfg)
            return 0
        from rlhf.api import train

        train(args.command, cfg)
        return 0
    except _user_errors() as e:
        print(f"rlhf {args.command}: error: {e}", file=sys.stderr)
        return 1
    except Terminated:
        print(f"rlhf {args.command}: terminated (SIGTERM)", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"rlhf {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        from rlhf.training.checkpoints import release_output_dirs

        release_output_dirs()  # also after an error: the output directory is free again


if __name__ == "__main__":
    sys.exit(main())
