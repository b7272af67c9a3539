"""``python -m ckpt_stage.cli``."""

from ckpt_stage.cli.commands import main

main()
