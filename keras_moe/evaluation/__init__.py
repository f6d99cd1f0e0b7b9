"""Evaluation: uncertainty metrics (`metrics`) and held-out scoring of
ViT classifiers and T5 translators (`scoring`)."""

from keras_moe.evaluation import metrics
from keras_moe.evaluation.scoring import evaluate
from keras_moe.evaluation.scoring import evaluate_model
from keras_moe.evaluation.scoring import score_classifier
from keras_moe.evaluation.scoring import score_translation
