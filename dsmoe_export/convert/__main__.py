"""``python -m dsmoe_export.convert``: see cli.py and docs/conversion.md."""
from .cli import main

raise SystemExit(main())
