"""`python -m graft ...` (and `torchrun -m graft ...`): the same as the `graft` command."""

from .cli.main import main

main()
