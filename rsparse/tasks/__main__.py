"""`python -m rsparse.tasks DIR`: write the offline lm-eval task YAMLs into DIR."""

from rsparse.tasks import _main

raise SystemExit(_main())
