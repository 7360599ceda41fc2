"""`python -m vae_hf` is the `vae-hf` console script."""

import sys

from vae_hf.cli import main

sys.exit(main())
