"""Evaluations of synthetic archives: the chest classifier and its training, train-on-synthetic /
test-on-real, FID per finding, disease diversity, the memorisation audit, the reader study, and
the report that gathers them."""
