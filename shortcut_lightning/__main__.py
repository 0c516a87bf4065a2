"""``python -m shortcut_lightning`` is the ``shortcut`` command."""

from shortcut_lightning.cli import main

main()
