"""transferkit: folder of labelled images -> features -> classifier -> ONNX on the edge.

The commands live next to the library code they wrap (``extract/commands.py``,
``classify/commands.py``, ``export/commands.py``); this file assembles them and turns library
errors into one-line messages.
"""

from __future__ import annotations

import os
import sys

from extract import quiet  # noqa: E402

quiet.install()  # keep TensorFlow's start-up chatter off the terminal (before anything imports it)

import click  # noqa: E402

from edge.files import no_space_reason  # noqa: E402
from edge.imageio import printable  # noqa: E402
from extract.errors import TransferKitError  # noqa: E402
from extract.version import __version__  # noqa: E402


class ToolGroup(click.Group):
    """A click group that shows library errors as ``Error: <message>`` instead of a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (TransferKitError, FileNotFoundError, PermissionError, IsADirectoryError) as exc:
            raise click.ClickException(printable(str(exc))) from None
        except (OSError, RuntimeError) as exc:  # h5py reports a full disk as either
            reason = no_space_reason(exc)
            if reason is None:
                raise
            raise click.ClickException(printable(f"{reason} (work written before is kept; free some space and "
                                                 f"run the command again)")) from None


@click.group(cls=ToolGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="transferkit")
def cli():
    """Transfer learning as a tool: extract deep features from an image folder, train light heads
    on them, fine-tune, export to ONNX and classify on CPU-only edge machines.

    \b
    Example:
      python cli.py extract photos/ --store features.h5 --backbone efficientnet_lite0
      python cli.py fit-head --store features.h5 --kind all --out head
      python cli.py export-onnx --store features.h5 --head head --out model.onnx
      python cli.py edge --model model.onnx --watch inbox/ --results results.jsonl
    """


def _register_commands() -> None:
    from extract.commands import COMMANDS as extract_commands

    commands = list(extract_commands)
    for module in ("classify.commands", "classify.audit_command", "export.commands", "export.retrain_command"):
        try:
            commands += __import__(module, fromlist=["COMMANDS"]).COMMANDS
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    for command in commands:
        cli.add_command(command)


@cli.command(
    "edge",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []},
    add_help_option=False,
)
@click.pass_context
def edge_command(ctx):
    """Watch a folder and classify every image dropped into it with an ONNX model (onnxruntime only).

    Same options as ``python -m edge``; run ``python cli.py edge --help`` to list them.
    """
    from edge.__main__ import main as edge_main

    sys.exit(edge_main(list(ctx.args), prog=ctx.command_path))


_register_commands()


def program_name(argv0: str) -> str:
    """The command as the user typed it: ``python cli.py`` for the script, ``transferkit`` for the
    console script (click would otherwise show the file name in both)."""
    name = os.path.basename(argv0)
    return "python cli.py" if name == "cli.py" else name or "transferkit"


def main() -> None:
    cli(prog_name=program_name(sys.argv[0]))


if __name__ == "__main__":
    main()
