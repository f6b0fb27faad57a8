"""`python -m samat` = the `samat` command."""

from samat.cli import cli

cli()
