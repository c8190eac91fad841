"""``python -m enforcer`` runs the command line."""

from enforcer.cli import main

raise SystemExit(main())
