"""An exported E^3 ViT serves its ensemble's averaged probabilities.

An E^3 model (a dense ViT upcycled with `ensemble_size=2`, token choice,
K=1, weights randomised so that the members disagree) is exported with
`export.saved_model` and loaded in a fresh process where `keras`,
`keras_moe` and `export` cannot be imported (`serving_harness.py`). Its
`probabilities` must equal the mean of the members' softmax, computed here
from the in-process model's per-member logits, within 1e-5. The ViT
adapter serves the ensemble's prediction only; it has no per-member output.
The same signatures also run through TensorFlow's C API loader, with no
Python in the process (`export.native_loader`).
"""

import sys

import keras
import numpy as np
import pytest

import keras_moe
from export import native_loader
from export import saved_model
from export import signature_names as names
from export.adapters import ServingOptions
from keras_moe.models.vit import ViT
from tests.export import export_test_utils as utils

TOLERANCE = 1e-5
MEMBERS = 2
XLA_BATCH = 4


@pytest.fixture(scope="module")
def e3_served(tmp_path_factory):
    keras.utils.set_random_seed(0)
    dense = ViT.from_architecture("vit_tiny")
    e3 = keras_moe.upcycle(
        dense,
        num_experts=4,
        ensemble_size=MEMBERS,
        encoder_router="tokens_choose",
        num_selected_experts=1,
    )
    utils.randomize(e3, seed=3)
    result = saved_model.export_saved_model(
        e3,
        tmp_path_factory.mktemp("models"),
        "vit_e3",
        version=1,
        options=ServingOptions(
            top_k=3, image_dtype="float32", xla_batch_size=XLA_BATCH
        ),
    )
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 256, (XLA_BATCH, 32, 32, 3), dtype=np.uint8)
    floats = pixels.astype("float32") / 255.0
    calls = [
        {
            "id": "default",
            "signature": names.SERVING_DEFAULT,
            "inputs": {names.IMAGES: floats},
        },
        {
            "id": "uint8",
            "signature": names.PREDICT_IMAGES_UINT8,
            "inputs": {names.IMAGES: pixels},
        },
        {
            "id": "xla",
            "signature": names.SERVING_XLA,
            "inputs": {names.IMAGES: floats},
        },
        # One image alone: no token is dropped, so it is served as in a batch.
        {
            "id": "single",
            "signature": names.SERVING_DEFAULT,
            "inputs": {names.IMAGES: floats[1:2]},
        },
    ]
    served = utils.run_harness(
        tmp_path_factory.mktemp("e3_harness"),
        {"saved_model": result.path, "calls": calls},
    )
    return result, floats, served


def _member_softmax(model, images):
    """<float64>[M, B, N] softmax of each member's in-process logits."""
    logits = keras.ops.convert_to_numpy(model.member_logits(images))
    return utils.softmax(logits)


def test_served_without_keras(e3_served):
    result, _, served = e3_served
    assert served["errors"] == {}
    assert served["blocked"] == {
        "keras": True,
        "keras_moe": True,
        "export": True,
    }
    assert result.model.ensemble_size == MEMBERS


def test_probabilities_are_the_mean_of_the_members_softmax(e3_served):
    result, floats, served = e3_served
    members = _member_softmax(result.model, floats)
    assert members.shape == (MEMBERS, XLA_BATCH, 10)
    # The members disagree: averaging them is not a no-op.
    assert np.abs(members[0] - members[1]).max() > 1e-2
    expected = members.mean(axis=0)
    for key in ("default", "uint8", "xla"):
        probabilities = served["outputs"][key][names.PROBABILITIES]
        assert probabilities.shape == expected.shape
        np.testing.assert_allclose(
            probabilities, expected, rtol=0, atol=TOLERANCE, err_msg=key
        )
    single = served["outputs"]["single"][names.PROBABILITIES]
    np.testing.assert_allclose(single, expected[1:2], rtol=0, atol=TOLERANCE)


def test_top_k_follows_the_averaged_probabilities(e3_served):
    result, floats, served = e3_served
    expected = _member_softmax(result.model, floats).mean(axis=0)
    outputs = served["outputs"]["default"]
    order = np.argsort(-expected, axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(outputs[names.TOP_K_CLASS_IDS], order)
    np.testing.assert_allclose(
        outputs[names.TOP_K_PROBABILITIES],
        np.take_along_axis(expected, order, axis=1),
        rtol=0,
        atol=TOLERANCE,
    )


def test_signatures_through_the_c_api(e3_served):
    result, floats, _ = e3_served
    expected = _member_softmax(result.model, floats).mean(axis=0)
    for signature in (names.SERVING_DEFAULT, names.SERVING_XLA):
        outputs = native_loader.run_signature(
            result.path, signature, {names.IMAGES: floats}
        )
        np.testing.assert_allclose(
            outputs[names.PROBABILITIES],
            expected,
            rtol=0,
            atol=TOLERANCE,
            err_msg=signature,
        )


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
