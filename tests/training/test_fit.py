"""`compile_for_task`, the one compile helper of training, the demo and
the experiments: loss, metrics, optimizer and jit policy per task."""

import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_moe.data import specs
from keras_moe.data.specs import CLASSIFICATION
from keras_moe.data.specs import TRANSLATION
from keras_moe.training import fit
from keras_moe.training.fit import compile_for_task


def _model():
    return keras.Sequential([keras.Input((3,)), keras.layers.Dense(4)])


class _Replicas:
    def __init__(self, count):
        self.num_replicas_in_sync = count


def test_classification_loss_metrics_and_optimizer():
    model = _model()
    compile_for_task(model, CLASSIFICATION, 0.01)
    assert isinstance(model.optimizer, keras.optimizers.Adam)
    assert float(model.optimizer.learning_rate) == pytest.approx(0.01)
    assert model.loss.get_config()["from_logits"]
    assert model.loss.get_config()["reduction"] == "sum_over_batch_size"
    x, y = np.ones((2, 3), "float32"), np.array([0, 1])
    logs = model.evaluate(x, y, verbose=0, return_dict=True)
    assert set(logs) == {"loss", "accuracy"}


def test_translation_loss_averages_over_real_tokens():
    model = keras.Sequential([keras.Input((2, 3)), keras.layers.Dense(4)])
    compile_for_task(model, TRANSLATION, 0.01)
    assert model.loss.get_config()["reduction"] == "mean_with_sample_weight"
    x = np.ones((1, 2, 3), "float32")
    y, w = np.array([[1, 0]]), np.array([[1.0, 0.0]], "float32")
    logs = model.evaluate(x, y, sample_weight=w, verbose=0, return_dict=True)
    assert set(logs) == {"loss", "token_accuracy"}
    logits = model.predict(x, verbose=0)[0, 0].astype(np.float64)
    expected = -(logits[1] - np.log(np.exp(logits).sum()))
    np.testing.assert_allclose(logs["loss"], expected, rtol=1e-5)


def test_given_optimizer_metrics_and_jit_policy():
    model = _model()
    optimizer = keras.optimizers.SGD(0.5)
    compile_for_task(
        model, CLASSIFICATION, optimizer=optimizer, metrics=[], jit_compile=True
    )
    assert model.optimizer is optimizer
    assert model.jit_compile
    x, y = np.ones((2, 3), "float32"), np.array([0, 1])
    assert set(model.evaluate(x, y, verbose=0, return_dict=True)) == {"loss"}
    # Keras cannot XLA-compile a multi-replica step.
    compile_for_task(
        model, CLASSIFICATION, 0.01, strategy=_Replicas(2), jit_compile=True
    )
    assert model.jit_compile is False
    compile_for_task(
        model, CLASSIFICATION, 0.01, strategy=_Replicas(1), jit_compile=True
    )
    assert model.jit_compile
    compile_for_task(
        model, CLASSIFICATION, 0.01, strategy=tf.distribute.get_strategy()
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"task": "regression", "learning_rate": 0.1}, "task must be"),
        ({"task": CLASSIFICATION}, "exactly one of learning_rate"),
        (
            {
                "task": CLASSIFICATION,
                "learning_rate": 0.1,
                "optimizer": keras.optimizers.SGD(),
            },
            "exactly one of learning_rate",
        ),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        compile_for_task(_model(), **kwargs)


def test_dense_model_fits_its_dataset():
    spec = specs.DataSpec(
        "composed_digits",
        specs.CLASSIFICATION,
        "/unused",
        image_shape=(8, 16, 1),
        num_classes=100,
    )
    model = fit.dense_model("vit", spec, {"model_dim": 16, "num_heads": 2})
    specs.check_model_fits_data(model, spec)
    assert model.image_hw == (8, 16) and model.num_layers == 4
    with pytest.raises(ValueError, match="architecture must be one of"):
        fit.dense_model("bert", spec)
    with pytest.raises(ValueError, match="T5 trains on 'number_words'"):
        fit.dense_model("t5", spec)


def test_progress_verbosity_follows_the_output(monkeypatch):
    import io

    from keras_moe.training.resumable import progress_verbosity

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stdout", Terminal())
    assert progress_verbosity("auto") == 1
    monkeypatch.setattr("sys.stdout", io.StringIO())  # a log file
    assert progress_verbosity("auto") == 2
    assert progress_verbosity(0) == 0 and progress_verbosity(1) == 1


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
