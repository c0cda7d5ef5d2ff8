"""``python -m seedprints_lightning``: the ``seedprints`` command line (:mod:`._entry`)."""

import sys

from ._entry import main

sys.exit(main())
