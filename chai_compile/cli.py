"""`chai-compile` command group: profile, export, verify, ...

This file only assembles the group and owns the process-level contract of the command line:
- every failure is one stderr line `chai-compile: error: <problem>; fix: <fix>`; bad input exits 2
  (click's usage errors included), a failed check 1, SIGTERM 143, Ctrl-C 130, a bug 3;
- SIGTERM unwinds like Ctrl-C, so staged output is removed;
- library warnings, log lines and progress bars are silenced: the CLI prints its own lines only;
- subcommand modules are imported on demand and import torch & co. only inside their functions, so
  `--help` stays fast.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import threading
import warnings
from typing import Any, NoReturn

import click

from chai_compile import __version__
from chai_compile.errors import ChaiError, Terminated

# name -> "module:attribute"; the order is the order of `--help`.
COMMANDS = {
    "profile": "chai_compile.profile.cli:profile",
    "profile-long": "chai_compile.profile.long_cli:profile_long",
    "plan": "chai_compile.plan.cli:plan",
    "inspect": "chai_compile.profile.inspect_cli:inspect",
    "verify": "chai_compile.verify.cli:verify",
    "sweep": "chai_compile.verify.cli:sweep",
    "export": "chai_compile.export.cli:export",
    "verify-artifact": "chai_compile.verify.artifact:verify_artifact",
    "build-ort-ops": "chai_compile.export.cli:build_ort_ops",
    "genai-pack": "chai_compile.export.genai_pack:genai_pack",
}
DEBUG_ENV = "CHAI_COMPILE_DEBUG"  # set to 1 to see the traceback behind an unexpected error


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"chai-compile: error: {' '.join(message.split())}", err=True)
    sys.exit(code)


def _usage_fix(e: click.ClickException) -> str:
    ctx = getattr(e, "ctx", None)
    names = []
    while ctx is not None and ctx.parent is not None:
        names.append(ctx.info_name)
        ctx = ctx.parent
    return f"see `{' '.join(['chai-compile', *reversed(names)])} --help`"


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def install_signal_handlers() -> None:
    """SIGTERM raises `Terminated`, so `finally`/`except BaseException` clean-ups run as on Ctrl-C."""
    if threading.current_thread() is threading.main_thread():  # signal() works only there
        signal.signal(signal.SIGTERM, _on_sigterm)


def quiet_libraries() -> None:
    """Silence what torch, transformers and onnx print on their own (set before they are imported)."""
    if not sys.warnoptions:  # an explicit -W / PYTHONWARNINGS wins
        warnings.simplefilter("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights" bar follows it
    # torch.onnx logs "torchvision is not installed. Skipping torchvision::nms" (4 lines) per export.
    if "transformers" in sys.modules:  # imported already (an embedding program): the env vars came too late
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    # torch resets its registered loggers on import, so the exact module logger is named.
    for name in ("torch.onnx._internal.exporter._registration", "onnxscript", "onnx_ir", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:  # a caller that handles click's exceptions itself
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        install_signal_handlers()
        quiet_libraries()
        try:
            code = super().main(args, prog_name or "chai-compile", complete_var, False, **extra)
        except ChaiError as e:
            _fail(e.one_line(), e.exit_code)
        except click.ClickException as e:
            _fail(f"{e.format_message().rstrip('.')}; fix: {_usage_fix(e)}", 2)
        except click.Abort:
            _fail("interrupted, nothing was written; fix: re-run the command", 130)
        except Terminated:
            _fail("terminated by SIGTERM, nothing was written; fix: re-run the command", Terminated.exit_code)
        except MemoryError:
            _fail("out of memory; fix: use a smaller model, --samples, --seq-len or --batch-size", 2)
        except Exception as e:
            if os.environ.get(DEBUG_ENV):
                raise
            _fail(f"unexpected {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}; "
                  f"fix: re-run with {DEBUG_ENV}=1 for the traceback and report it", 3)
        sys.exit(code or 0)


@click.group(cls=_LazyGroup)
@click.version_option(__version__, prog_name="chai-compile")
def main() -> None:
    """Clustered Head Attention compiler: profile -> mapping -> rewrite -> export -> verify."""
