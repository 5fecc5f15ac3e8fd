"""``python -m meshd`` is the ``meshd`` command."""

from meshd.cli.daemon import main

raise SystemExit(main())
