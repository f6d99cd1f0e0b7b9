"""keras_moe.data.specs: dataset descriptions and the model/data check."""

import sys

import pytest

from keras_moe.data import specs
from keras_moe.models.t5 import T5
from tests import tiny_models


def test_check_model_fits_data():
    digits = specs.DataSpec(
        "digits",
        specs.CLASSIFICATION,
        "/unused",
        image_shape=(8, 8, 1),
        num_classes=10,
    )
    specs.check_model_fits_data(tiny_models.tiny_vit(), digits)
    with pytest.raises(ValueError, match=r"images \(8, 8, 1\) and 10"):
        specs.check_model_fits_data(tiny_models.tiny_vit(num_classes=4), digits)
    with pytest.raises(ValueError, match="needs a ViT"):
        specs.check_model_fits_data(T5.from_architecture("t5_tiny"), digits)
    words = specs.DataSpec("number_words", specs.TRANSLATION, "/unused")
    with pytest.raises(ValueError, match="vocab_size=128"):
        specs.check_model_fits_data(T5.from_architecture("t5_tiny"), words)
    with pytest.raises(ValueError, match="needs a T5"):
        specs.check_model_fits_data(tiny_models.tiny_vit(), words)


def test_describe_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="Unknown dataset 'nope'"):
        specs.describe_dataset("nope", str(tmp_path))
    spec = specs.describe_dataset("number_words", str(tmp_path))
    assert spec.kind == specs.TRANSLATION and spec.input_length == 16


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
