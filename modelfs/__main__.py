"""`python -m modelfs` is the `modelfs` command."""

from __future__ import annotations

from modelfs.service.cli import main

raise SystemExit(main())
