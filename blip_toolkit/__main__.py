"""`python -m blip_toolkit` is the same as the `blip` command (and works under `accelerate launch -m`)."""

import sys

from blip_toolkit.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
