"""``python -m lab.comet``: start the comet server."""

from lab.comet import main

raise SystemExit(main())
