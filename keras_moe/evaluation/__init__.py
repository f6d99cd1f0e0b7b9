"""Evaluation: uncertainty metrics (`metrics`), exact match of generated
token ids (`sequences`) and held-out scoring of ViT classifiers and T5
translators (`scoring`)."""

from keras_moe.evaluation import metrics
from keras_moe.evaluation.scoring import evaluate
from keras_moe.evaluation.scoring import evaluate_model
from keras_moe.evaluation.scoring import score_classifier
from keras_moe.evaluation.scoring import score_translation
from keras_moe.evaluation.sequences import exact_matches
from keras_moe.evaluation.sequences import until_eos
