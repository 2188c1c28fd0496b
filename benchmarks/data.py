"""Prepare and loader throughput: `python benchmarks/data.py [--n 64 --size 1024]`."""
import sys

from xrayforge.bench.data import main

sys.exit(main())
