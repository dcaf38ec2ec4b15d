"""The `apet-export` command line: a click group; each command is a thin wrapper over a library function."""

from __future__ import annotations

import sys

import click

from apet_export import __version__
from apet_export.errors import ApetExportError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="apet-export")
def cli():
    """Export vision-language models with ApET visual-token compression, check parity, run them."""


def main(argv: list[str] | None = None) -> None:
    """Entry point: typed errors become one clear line on stderr and exit status 1."""
    try:
        cli.main(args=argv, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except ApetExportError as error:
        click.secho(f"error: {error}", fg="red", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
