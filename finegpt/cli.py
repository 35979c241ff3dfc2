"""The `finegpt` command: a click group whose subcommands live beside the code they drive.

Subcommands are imported on first use, so `finegpt --help` does not pay for importing torch.
"""

import importlib

import click

from finegpt import __version__
from finegpt.errors import FinegptError

# name -> "module:attribute" of a click command; the one list of subcommands.
SUBCOMMANDS = {
    "prepare": "finegpt.prepare:prepare_command",
    "shards": "finegpt.prepare:shards_command",
    "presets": "finegpt.presets:presets_command",
    "train": "finegpt.train:train_command",
    "sample": "finegpt.sample:sample_command",
    "bench": "finegpt.bench.cli:bench_command",
}

SHORT_HELP = {
    "prepare": "Tokenize FineWeb (or local text) into GPT-2 token shards.",
    "shards": "List and validate a directory of token shards.",
    "presets": "Show the config chosen for each VRAM tier, with real sizes and memory.",
    "train": "Train a GPT with the preset that fits your card.",
    "sample": "Generate text from a trained checkpoint.",
    "bench": "Measure fused against eager, and the loader against plain loading.",
}


class LazyGroup(click.Group):
    """Loads each subcommand's module only when that subcommand runs, and turns FinegptError
    (a user's mistake) into a one-line message instead of a traceback."""

    def list_commands(self, ctx):
        return list(SUBCOMMANDS)

    def get_command(self, ctx, name):
        if name not in SUBCOMMANDS:
            return None
        module_name, attr = SUBCOMMANDS[name].split(":")
        return getattr(importlib.import_module(module_name), attr)

    def format_commands(self, ctx, formatter):
        # Short help from our table, so listing commands imports nothing heavy.
        rows = [(name, SHORT_HELP[name]) for name in SUBCOMMANDS]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except FinegptError as err:
            raise click.ClickException(str(err)) from None


@click.group(cls=LazyGroup)
@click.version_option(__version__, prog_name="finegpt")
def main():
    """finegpt: train GPT-2-class models on FineWeb with one GPU of limited memory."""
