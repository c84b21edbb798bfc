"""`python -m denoisplit_zoo ...` = `denoisplit-zoo ...` (what torchrun starts: `torchrun ... -m denoisplit_zoo train`)."""

import sys

from .cli import main

sys.exit(main())
