"""One WGAN-GP PGGAN step, fast path vs eager baseline: `python benchmarks/train_step.py`."""
import sys

from xrayforge.bench.train_step import main

sys.exit(main())
