"""`python -m comfyui_int8_convrot convert|inspect ...`: the same as the `int8-convrot` command."""
import sys

from .cli import main

sys.exit(main())  # main() with no arguments exits the process itself (see cli.main)
