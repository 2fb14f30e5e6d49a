"""``python -m dori``: the command line, for launchers that start a module (``accelerate launch -m dori``)."""

from dori.cli import main

main()
