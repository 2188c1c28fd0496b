"""pytorch-fid-equivalent pipeline vs ours: `python benchmarks/fid.py [--inception PATH]`."""
import sys

from xrayforge.bench.fid import main

sys.exit(main())
