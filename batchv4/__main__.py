"""`python -m batchv4` runs the CLI."""

from batchv4.cli import main

main()
