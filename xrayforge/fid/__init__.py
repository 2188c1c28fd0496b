"""Fast, exact FID: pytorch-fid's Inception, fused preprocessing, float64 streaming moments."""
from .compute import FeatureExtractor, bootstrap_fid, compute_fid, kid
from .inception import FIDInception, find_weights, load_inception
from .preprocess import preprocess
from .stats import FrechetStats, StreamingMoments, frechet_distance

__all__ = ["FIDInception", "find_weights", "load_inception", "preprocess", "FrechetStats", "StreamingMoments",
           "frechet_distance", "FeatureExtractor", "compute_fid", "kid", "bootstrap_fid"]
