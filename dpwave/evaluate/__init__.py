"""Evaluation of generated images: FID (InceptionV3 from a weights file), the FD-cls
surrogate, FD-lowpass (shape), improved precision/recall, conditioning accuracy, downstream
accuracy and a memorization check.

Images are NHWC numpy arrays, uint8 or float in [-1, 1]. `evaluate_samples` runs all of it.
"""
from dpwave.evaluate.classifier import (
    Classifier, FitResult, TrainConfig, accuracy, classifier_features, predict, predict_from_features,
    train_classifier)
from dpwave.evaluate.conditioning import Conditioning, conditioning_accuracy
from dpwave.evaluate.downstream import DownstreamResult, downstream_accuracy
from dpwave.evaluate.fid import fid, inception_features
from dpwave.evaluate.frechet import frechet_distance, frechet_distance_from_stats, gaussian_stats
from dpwave.evaluate.inception import InceptionV3
from dpwave.evaluate.inception_weights import InceptionWeightsError, load_inception
from dpwave.evaluate.lowpass import FD_LOWPASS_NAME, lowpass, lowpass_frechet_distance
from dpwave.evaluate.memorization import Memorization, memorization
from dpwave.evaluate.precision_recall import PrecisionRecall, precision_recall
from dpwave.evaluate.report import METRICS, conditioning_line, evaluate_samples, format_report
from dpwave.evaluate.surrogate import FD_CLS_NAME, train_feature_classifier

__all__ = [
    "FD_CLS_NAME", "FD_LOWPASS_NAME", "METRICS", "Classifier", "Conditioning", "DownstreamResult", "FitResult",
    "InceptionV3", "InceptionWeightsError", "Memorization", "PrecisionRecall", "TrainConfig", "accuracy",
    "classifier_features", "conditioning_accuracy", "conditioning_line", "downstream_accuracy",
    "evaluate_samples", "fid", "format_report", "frechet_distance", "frechet_distance_from_stats",
    "gaussian_stats", "inception_features", "load_inception", "lowpass", "lowpass_frechet_distance",
    "memorization", "precision_recall", "predict", "predict_from_features", "train_classifier",
    "train_feature_classifier",
]
