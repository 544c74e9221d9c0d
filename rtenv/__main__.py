"""``python -m rtenv``: the ``rtenv`` command line."""

from rtenv.cli import main

raise SystemExit(main())
