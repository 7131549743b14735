"""``python -m modlora``: the ``modlora`` command, also as torchrun runs it
(``torchrun --standalone --nproc-per-node N -m modlora run CONFIG.toml``)."""

import sys

from .cli import main

sys.exit(main())
