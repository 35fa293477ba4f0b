"""`expertmesh` with fault injection enabled: how the tests start a run in a subprocess (or under
torchrun) that honours EXPERTMESH_FAULT. No installed entry point does (expertmesh/faults.py)."""

import sys

from expertmesh import faults
from expertmesh.cli import main

if __name__ == "__main__":
    faults.ENABLED = True
    sys.exit(main())
