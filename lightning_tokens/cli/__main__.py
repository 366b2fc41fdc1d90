"""``python -m lightning_tokens.cli`` (as torchrun launches it) is the ``lightning-tokens`` command."""

from lightning_tokens.cli.app import main

main()
