"""Evaluation of generated images: FID (InceptionV3 from a weights file), the FD-cls
surrogate, improved precision/recall, downstream accuracy and a memorization check.

Images are NHWC numpy arrays, uint8 or float in [-1, 1]. `evaluate_samples` runs all of it.
"""
from dpwave.evaluate.classifier import (
    Classifier, FitResult, TrainConfig, accuracy, classifier_features, predict, train_classifier)
from dpwave.evaluate.downstream import DownstreamResult, downstream_accuracy
from dpwave.evaluate.fid import fid, inception_features
from dpwave.evaluate.frechet import frechet_distance, frechet_distance_from_stats, gaussian_stats
from dpwave.evaluate.inception import InceptionV3
from dpwave.evaluate.inception_weights import InceptionWeightsError, load_inception
from dpwave.evaluate.memorization import Memorization, memorization
from dpwave.evaluate.precision_recall import PrecisionRecall, precision_recall
from dpwave.evaluate.report import METRICS, evaluate_samples, format_report
from dpwave.evaluate.surrogate import FD_CLS_NAME, train_feature_classifier

__all__ = [
    "Classifier", "DownstreamResult", "FD_CLS_NAME", "FitResult", "InceptionV3", "InceptionWeightsError",
    "METRICS", "Memorization", "PrecisionRecall", "TrainConfig", "accuracy", "classifier_features",
    "downstream_accuracy", "evaluate_samples", "fid", "format_report", "frechet_distance",
    "frechet_distance_from_stats", "gaussian_stats", "inception_features", "load_inception",
    "memorization", "precision_recall", "predict", "train_classifier", "train_feature_classifier",
]
