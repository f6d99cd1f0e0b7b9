"""keras_moe.checkpoints.load_model: `.keras` files and checkpoints, and
the errors for the wrong architecture or a missing or broken file."""

import os
import sys

import numpy as np
import pytest

from keras_moe import checkpoints
from keras_moe.utils import files
from tests import tiny_models


def test_load_model_reads_keras_files_and_checkpoints(tmp_path):
    model = tiny_models.tiny_vit()
    path = files.save_keras(model, tmp_path / "sub" / "vit.keras")
    assert os.listdir(tmp_path / "sub") == ["vit.keras"]  # no temp left
    loaded = checkpoints.load_model(path, architecture="vit")
    np.testing.assert_allclose(
        loaded(tiny_models.images()), model(tiny_models.images()), atol=1e-6
    )
    with pytest.raises(ValueError, match="holds a vit model"):
        checkpoints.load_model(path, architecture="t5")
    with pytest.raises(ValueError, match="no model file"):
        checkpoints.load_model(tmp_path / "missing.keras")
    with pytest.raises(ValueError, match="does not exist"):
        checkpoints.load_model(tmp_path / "missing_checkpoint")
    (tmp_path / "bad.keras").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="cannot load"):
        checkpoints.load_model(tmp_path / "bad.keras")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
