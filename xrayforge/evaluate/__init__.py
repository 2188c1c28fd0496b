"""Evaluations: the chest classifier, and the metrics shared by the evaluation suite."""
