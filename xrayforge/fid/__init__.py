"""Fast, exact FID: pytorch-fid's Inception, fused preprocessing, float64 streaming moments; any
feature space (``features``); precision / recall / density / coverage (``prdc``); and the
metrics measured during training (``training``)."""
from .compute import FeatureExtractor, bootstrap_fid, compute_fid, kid
from .features import feature_space
from .inception import FIDInception, find_weights, load_inception
from .prdc import density_coverage, prdc, precision_recall
from .preprocess import preprocess
from .stats import FrechetStats, StreamingMoments, frechet_distance

__all__ = ["FIDInception", "find_weights", "load_inception", "preprocess", "FrechetStats", "StreamingMoments",
           "frechet_distance", "FeatureExtractor", "compute_fid", "kid", "bootstrap_fid", "feature_space",
           "precision_recall", "density_coverage", "prdc"]
