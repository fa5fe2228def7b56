"""``python -m scalesim.run WORLD.yaml``: see :func:`scalesim.run.main`."""

from scalesim.run import main

raise SystemExit(main())
