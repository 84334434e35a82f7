"""Click options that several commands share, defined once (as sqlite-utils shares its option decorators).

    @click.command("extract")
    @backbone_option(default=DEFAULT_BACKBONE)
    @weights_option(default="imagenet")
    @engine_option
    @json_option("Print the summary as JSON.")
    def extract_command(backbone, weights, engine, as_json): ...

The choices come from the library (the backbone registry, ``ENGINES``, ``FEATURE_DTYPES``, ``SPLITS``),
so a command cannot offer a value the library refuses.
"""

from __future__ import annotations

from collections.abc import Callable

import click

from extract.backbones import list_backbones
from extract.engine import ENGINES
from extract.record import FEATURE_DTYPES
from extract.splits import SPLITS

WEIGHTS_HELP = "imagenet (Keras cache or the installed package), none (random, for tests/timing) or a weights file PATH"
Decorator = Callable[[Callable], Callable]


def backbone_option(default: str | None = None,
                    help: str = "A registered backbone (list them with `backbones`).") -> Decorator:
    """``--backbone`` among the registered backbones; ``default`` None means the command picks one."""
    return click.option("--backbone", type=click.Choice([spec.name for spec in list_backbones()]), default=default,
                        show_default=default is not None, help=help)


def weights_option(default: str | None = None, help: str = WEIGHTS_HELP + ".") -> Decorator:
    """``--weights imagenet|none|PATH``; ``default`` None means the record's (head's, model's) weights."""
    return click.option("--weights", default=default, show_default=default is not None, help=help)


ENGINE_HELP = "auto: onnxruntime (converted once, cached and checked against Keras), Keras if that fails."


def engines_option(extra: tuple[str, ...] = (), help: str = ENGINE_HELP) -> Decorator:
    """``--engine`` among ``ENGINES`` plus ``extra`` (extract adds its int8 engine)."""
    return click.option("--engine", type=click.Choice([*ENGINES, *extra]), default=ENGINES[0], show_default=True,
                        help=help)


engine_option = engines_option()


def dtype_option(command: Callable) -> Callable:
    return click.option("--dtype", type=click.Choice(FEATURE_DTYPES), default=FEATURE_DTYPES[0], show_default=True,
                        help="Feature dtype in the store.")(command)


def json_option(help: str = "Print JSON.") -> Decorator:
    """``--json``, passed to the command as ``as_json``."""
    return click.option("--json", "as_json", is_flag=True, help=help)


def split_option(default: str = "test") -> Decorator:
    return click.option("--split", type=click.Choice(SPLITS), default=default, show_default=True,
                        help="Which split of the store to use.")
