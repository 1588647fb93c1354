"""``python -m adaptkit``: the command line (see :mod:`adaptkit.cli`)."""

from .cli import main

raise SystemExit(main())
