"""`python -m rsparse.eval.tasks DIR`: write the offline lm-eval task YAMLs into DIR."""

from rsparse.eval.tasks import _main

raise SystemExit(_main())
