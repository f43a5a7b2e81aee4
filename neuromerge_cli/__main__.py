"""`python -m neuromerge_cli` is the same as the `neuromerge` command."""

from .cli import main

main()
