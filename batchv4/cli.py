"""The `batchv4` Click group.

Owns: the command table and turning user errors into one-line messages with a non-zero exit. Does not
own: any command's logic (each lives in `batchv4.pipelines`) or option parsing beyond the group.
Commands are imported lazily so `batchv4 estimate` never imports torch.
"""

from __future__ import annotations

import importlib
import sys

import click

# command name -> "module:attribute" of a click.Command
COMMANDS = {
    "run": "batchv4.pipelines.run_cmd:run",
    "estimate": "batchv4.pipelines.estimate_cmd:estimate",
    "report": "batchv4.pipelines.report_cmd:report",
    "model-info": "batchv4.pipelines.model_info:model_info",
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


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except (ValueError, OSError, KeyError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        click.echo(f"Error: {msg}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
