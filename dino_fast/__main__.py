"""``python -m dino_fast`` is the ``dino-fast`` command."""
from dino_fast.cli import main

raise SystemExit(main())
