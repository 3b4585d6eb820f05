"""The `batchv4` Click group.

Owns: the command table and turning user errors into one-line messages with a non-zero exit. Does not
own: any command's logic (each lives in `batchv4.pipelines`) or option parsing beyond the group.
Commands are imported lazily so `batchv4 estimate` never imports torch.
"""

from __future__ import annotations

import importlib
import logging
import sys

import click

# command name -> "module:attribute" of a click.Command
COMMANDS = {
    "run": "batchv4.pipelines.run_cmd:run",
    "estimate": "batchv4.pipelines.estimate_cmd:estimate",
    "report": "batchv4.pipelines.report_cmd:report",
    "model-info": "batchv4.pipelines.model_info:model_info",
    "serve": "batchv4.serve.cmd:serve",
    "generate": "batchv4.pipelines.generate_cmd:generate",
    "summarize": "batchv4.pipelines.summarize_cmd:summarize",
}


def _available() -> dict[str, str]:
    out = {}
    for name, target in COMMANDS.items():
        mod = target.split(":")[0]
        if importlib.util.find_spec(mod) is not None:
            out[name] = target
    return out


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_available())

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = _available().get(name)
        if target is None:
            return None
        mod, attr = target.split(":")
        return getattr(importlib.import_module(mod), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="batchv4")
def cli() -> None:
    """Offline batch inference for DeepSeek-V4: datasets in, outputs and per-row cost out."""


class _StderrHandler(logging.Handler):
    """batchv4's warnings on stderr, one line each; the stream is looked up at each message."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"{record.levelname.lower()}: {self.format(record)}", err=True)


def _log_to_stderr() -> None:
    logger = logging.getLogger("batchv4")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        logger.addHandler(_StderrHandler())


class _Terminated(KeyboardInterrupt):
    """SIGTERM (what kill, Slurm and Kubernetes send), raised like Ctrl-C so a run flushes its
    manifest, releases its folder and removes its scratch space on the way out."""


def _on_sigterm(signum, frame) -> None:
    raise _Terminated()


def main() -> None:
    import signal
    import traceback

    from batchv4.errors import UserError

    terminated = False
    _log_to_stderr()
    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:                    # not the main thread (embedded use): leave signals alone
        pass
    try:
        try:
            cli.main(standalone_mode=False)
        except click.exceptions.Abort as e:
            terminated = isinstance(e.__context__, _Terminated) or isinstance(e.__cause__, _Terminated)
            raise
    except click.exceptions.Abort:
        click.echo("Terminated." if terminated else "Aborted.", err=True)
        sys.exit(143 if terminated else 130)
    except _Terminated:
        click.echo("Terminated.", err=True)
        sys.exit(143)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except UserError as e:
        click.echo(f"Error: {_line(e)}", err=True)
        sys.exit(1)
    except OSError as e:                  # storage and files: the environment, not a bug
        click.echo(f"Error: {_line(e)}", err=True)
        sys.exit(1)
    except Exception:
        traceback.print_exc()
        click.echo("Error: this is a bug in batchv4 (an unexpected error, traceback above); please report it",
                   err=True)
        sys.exit(2)


def _line(e: BaseException) -> str:
    from batchv4.io.urls import first_line

    return first_line(e)


if __name__ == "__main__":
    main()
