"""``python -m dfp.harness``: the comparison harness (see ``dfp.harness.cli``)."""

from .cli import main

raise SystemExit(main())
