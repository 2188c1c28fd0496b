"""Fused ops vs eager PyTorch at the PGGAN's shapes: `python benchmarks/ops.py [--quick]`."""
import sys

from xrayforge.bench.ops import main

sys.exit(main())
