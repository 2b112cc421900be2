"""`python -m modelfs` is the `modelfs` command."""

from __future__ import annotations

from modelfs.cli import main

raise SystemExit(main())
