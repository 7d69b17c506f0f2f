"""The ``loretta-merge`` command line: a thin layer over the Python API.

Each command lives in ``loretta_merge/commands/<name>.py`` and is imported only when it
runs, so ``--help`` and ``--version`` start fast (no torch import). ``BASE+ADAPTER`` as
the first argument is short for ``merge BASE ADAPTER``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import logging
import os
import sys
import warnings

import click

from . import __version__

# command name -> "module:attribute" under loretta_merge.commands
COMMANDS = {
    "merge": "merge:merge_command",
    "convert": "convert:convert_group",
    "export": "export:export_group",
    "train": "train:train_command",
    "inspect": "inspect:inspect_command",
    "extract": "extract:extract_command",
    "combine": "combine:combine_command",
}
SHORT_HELP = {
    "merge": "Merge adapters into a base checkpoint (streaming).",
    "convert": "Convert between PEFT LoRA and LoRETTA tensor-train form.",
    "export": "Export a model to ONNX (validated) or re-shard safetensors.",
    "train": "Fine-tune a model with LoRETTA_rep or LoRETTA_adp.",
    "inspect": "Describe an adapter or model, or count what an adapter would train.",
    "extract": "Extract a LoRA or TT adapter from a full fine-tune.",
    "combine": "Combine several adapters into one LoRA or TT adapter.",
}


# options of the top-level group itself; everything else before BASE+ADAPTER belongs to merge
GROUP_OPTIONS = {"--debug", "-h", "--help", "-V", "--version"}
QUIET_HELP = "Print nothing on success (errors go to stderr as always; --json output is printed)."


def _quiet_flag(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    if value:
        ctx.meta["loretta.quiet"] = True
    return value


def _quiet_callback(callback):
    """Run ``callback`` silenced when -q was given: stdout swallowed (unless --json), Python
    warnings and log records below ERROR dropped (import-time chatter of torch and friends).
    Errors still reach stderr: they are printed by :func:`main` after the command returns."""
    @functools.wraps(callback)
    def run(*args, **kwargs):
        ctx = click.get_current_context()
        if not (ctx.meta.get("loretta.quiet") or kwargs.get("quiet")):
            return callback(*args, **kwargs)
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            with warnings.catch_warnings(), contextlib.ExitStack() as stack:
                warnings.simplefilter("ignore")
                if not kwargs.get("as_json"):
                    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
                return callback(*args, **kwargs)
        finally:
            logging.disable(previous)
    return run


def add_quiet_option(command: click.Command) -> click.Command:
    """Give ``command`` (and every sub-command of a group) ``-q/--quiet``, once.

    Commands that declare their own ``quiet`` parameter (merge, train) keep it (they also
    turn off their progress bars with it); every command runs silenced under -q, see
    :func:`_quiet_callback`. With --json the JSON still prints.
    """
    if getattr(command, "_loretta_quiet", False):
        return command
    command._loretta_quiet = True
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            add_quiet_option(sub)
        return command
    if not any(p.name == "quiet" for p in command.params):
        command.params.append(click.Option(["-q", "--quiet"], is_flag=True, expose_value=False,
                                           callback=_quiet_flag, help=QUIET_HELP))
    command.callback = _quiet_callback(command.callback)
    return command


def _takes_value(option: str) -> bool:
    """Whether the merge option ``option`` (e.g. ``-o``) consumes the next argument."""
    from .commands.merge import merge_command

    for param in merge_command.params:
        if isinstance(param, click.Option) and option in param.opts + param.secondary_opts:
            return not param.is_flag and not param.count
    return False


def shorthand_args(args: list[str]) -> list[str]:
    """``[-o OUT] BASE+ADAPTER[:W]+... [options]`` -> ``merge [-o OUT] BASE+... [options]``.

    The first positional argument decides: a command name leaves ``args`` as they are; a
    token with ``+`` makes it a merge, wherever merge's options stand (``-o OUT`` may come
    first). The group's own options (--debug, --help, --version) stay in front of ``merge``.
    """
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            return args
        if arg.startswith("-") and arg != "-":
            if arg not in GROUP_OPTIONS and "=" not in arg and _takes_value(arg):
                i += 1  # skip the option's value
            i += 1
            continue
        if arg in COMMANDS or "+" not in arg:
            return args
        front = [a for a in args[:i] if a in GROUP_OPTIONS]
        moved = [a for a in args[:i] if a not in GROUP_OPTIONS]
        return front + ["merge"] + moved + args[i:]
    return args


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        try:
            mod = importlib.import_module(f"loretta_merge.commands.{module}")
        except ModuleNotFoundError as exc:
            if exc.name == f"loretta_merge.commands.{module}":
                return None
            raise
        return add_quiet_option(getattr(mod, attr))

    def format_commands(self, ctx, formatter):
        rows = [(name, SHORT_HELP.get(name, "")) for name in COMMANDS if self.get_command(ctx, name)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def parse_args(self, ctx, args):
        # `loretta-merge [-o OUT] BASE+ADAPTER[:W]+... -o OUT` is `loretta-merge merge ...`
        return super().parse_args(ctx, shorthand_args(list(args)))


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]},
             epilog="Examples:\n\n\b\n  loretta-merge ./llama+./my-adapter -o ./merged\n"
                    "  loretta-merge convert lora-to-tt ./peft-lora -o ./tt --eps 0.05\n"
                    "  loretta-merge export onnx ./merged -o ./onnx\n"
                    "  loretta-merge inspect ./my-adapter\n\n"
                    "No command contacts the network; models and data come from local paths.")
@click.version_option(__version__, "-V", "--version", prog_name="loretta-merge")
@click.option("--debug", is_flag=True, envvar="LORETTA_DEBUG",
              help="Show full Python tracebacks instead of one-line errors.")
@click.pass_context
def cli(ctx, debug):
    """Tensor-train (LoRETTA) adapters: fine-tune, merge, convert, export.

    BASE+ADAPTER as the first argument is short for `merge BASE ADAPTER`.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


class _OptionalBackendNoise(logging.Filter):
    """Drops the log records that importing torchao or bitsandbytes prints, and nothing else.

    loretta-merge never imports torchao (a torchao checkpoint is read as plain safetensors,
    see ``quant/torchao.py``). transformers does: ``transformers.quantizers`` imports every
    installed quantization back end when any model class loads, and torchao's import logs
    (1) "Failed to load .../torchao/_C_*.so" for its CUDA-only kernels and (2) through torch's
    ``torch.utils._pytree`` logger "<enum ...> is an Enum subclass ... Calling
    register_constant() on Enum subclasses is deprecated" for its own enums. Training
    imports ``transformers.trainer_utils``, which imports peft, which imports bitsandbytes;
    on a CPU with AVX512-BF16 its import asks the ``kernels`` package for a hub kernel, and
    offline (the CLI sets ``HF_HUB_OFFLINE``) that logs (3) "Skipping publisher trust check
    for 'kernels-community/..." and (4) "Failed to load CPU gemm_4bit_forward from
    kernels-community". None is about the user's command, so only those four messages are
    filtered; every other record of those loggers passes. These are log records, not
    ``warnings``: a warnings filter cannot catch them.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.name == "torch.utils._pytree":
            return "Calling register_constant() on Enum subclasses is deprecated" not in message
        if record.name == "torchao":
            return not (message.startswith("Failed to load ") and "/torchao/_C" in message)
        if record.name == "kernels._internals.hf_hub":
            return not (message.startswith("Skipping publisher trust check for 'kernels-community/")
                        and "offline mode" in message)
        if record.name == "bitsandbytes.backends.cpu.ops":
            return not message.startswith("Failed to load CPU gemm_4bit_forward from kernels-community")
        return True


def quiet_optional_backend_noise() -> None:
    """Install :class:`_OptionalBackendNoise` on the four loggers (once; before or after the
    libraries are imported: a logger's filters belong to the logger object)."""
    for name in ("torch.utils._pytree", "torchao", "kernels._internals.hf_hub",
                 "bitsandbytes.backends.cpu.ops"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _OptionalBackendNoise) for f in logger.filters):
            logger.addFilter(_OptionalBackendNoise())


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one-line errors for bad input, exit codes by kind."""
    quiet_optional_backend_noise()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # our own one-line errors and progress bars only; transformers' load reports and
    # weight-loading bars are noise here (LORETTA_DEBUG / TRANSFORMERS_VERBOSITY override)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read at torch import; see merge/run.py
    # MKL's strict reproducible mode: its GEMMs give the same bits on any thread count (on
    # AVX-512 CPUs the default mode does not), so a merge's bytes do not depend on the
    # cores; read at MKL's first call, costs <=10% on the rank-r update; see merge/run.py
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or bool(os.environ.get("LORETTA_DEBUG"))
    try:
        cli.main(args=argv, prog_name="loretta-merge", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        # one line, like every other error; usage errors point at the command's help
        hint = ""
        if isinstance(exc, click.UsageError) and exc.ctx is not None:
            hint = f" (see `{exc.ctx.command_path} --help`)"
        click.echo(f"error: {exc.format_message()}{hint}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:  # click's form of Ctrl-C
        click.echo("error: interrupted; no output was written", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("error: interrupted; no output was written", err=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the one place errors become exit codes
        from .errors import LorettaError

        if debug:
            raise
        if isinstance(exc, LorettaError):
            click.echo(f"error: {' '.join(str(exc).split())}", err=True)  # one line, always
            sys.exit(exc.exit_code)
        if isinstance(exc, (OSError, MemoryError)):
            click.echo(f"error: {type(exc).__name__}: {exc}", err=True)
            sys.exit(1)
        raise
    sys.exit(0)


if __name__ == "__main__":  # pragma: no cover
    main()
