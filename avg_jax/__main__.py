"""`python -m avg_jax` is the `avg-jax` command."""

import sys

from avg_jax.cli import main

sys.exit(main())
