"""`python -m hpa_lightning.bench [quick=true] [sections=...]`: the speed benchmark (see hpa_lightning/bench/)."""

import sys

from hpa_lightning.bench.options import parse_arguments
from hpa_lightning.cli import fail
from hpa_lightning.errors import UsageError

if __name__ == "__main__":
    try:
        parse_arguments(sys.argv[1:])  # --help and a bad argument are answered before the sections import torch
    except UsageError as err:
        fail(err)
    from hpa_lightning.bench.suite import main

    main()
