"""The ``ckpt-stage`` command (``ckpt_stage.cli:main``): click commands of the contract, thin callers of the library.

``commands`` holds the group and the core commands, ``show`` and ``webhook`` the commands that live
beside their feature. The core never imports this package.
"""

from ckpt_stage.cli.commands import main

__all__ = ["main"]
