"""`chai-compile` command group: profile, export, verify.

Each subcommand lives beside the stage it drives; this file only assembles the group and turns
typed errors into one-line messages with a non-zero exit code.
"""

from __future__ import annotations

import sys

import click

from chai_compile import __version__
from chai_compile.errors import ChaiError


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ChaiError as e:
            click.echo(f"chai-compile: error: {e.one_line()}", err=True)
            sys.exit(e.exit_code)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="chai-compile")
def main() -> None:
    """Clustered Head Attention compiler: profile -> mapping -> rewrite -> export -> verify."""


from chai_compile.inspect_cli import inspect  # noqa: E402
from chai_compile.profile_cli import profile  # noqa: E402

main.add_command(profile)
main.add_command(inspect)
from chai_compile.verify.cli import verify  # noqa: E402, I001
main.add_command(verify)
from chai_compile.verify.cli import sweep  # noqa: E402, I001
main.add_command(sweep)
from chai_compile.export.cli import build_ort_ops, export, verify_artifact  # noqa: E402, I001
main.add_command(export)
main.add_command(build_ort_ops)
main.add_command(verify_artifact)
