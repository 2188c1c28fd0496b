"""LCO vs rejection sampling, and sampling speed: `python benchmarks/lco.py RUN CLASSIFIER --targets ...`."""
import sys

from xrayforge.bench.lco import main

sys.exit(main())
