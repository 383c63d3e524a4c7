"""``python -m lab.agent`` runs the load agent (``lab.agent.coordinator.main``)."""

from lab.agent.coordinator import main

raise SystemExit(main())
