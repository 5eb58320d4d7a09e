"""``python -m geste.cli``."""

from . import main

main()
