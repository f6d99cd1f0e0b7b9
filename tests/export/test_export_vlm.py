"""The exported VisionLanguageModel, called as TF Serving calls it.

The SavedModel is loaded once in a fresh process where `keras`, `keras_moe`
and `export` cannot be imported (`serving_harness.py`, TensorFlow Text ops
loaded); its `caption`, `serving_default` and `serving_xla` signatures are
called there, directly and through `PredictRequest` protos, with good and
bad inputs. Here, the same images are prepared with NumPy and the prompts
tokenised with the `sentencepiece` package, the in-process Keras model
generates, and the texts and token ids must be identical. The signatures
also run through TensorFlow's C API loader, with no Python in the process
and tf-text's op libraries loaded (`export.native_loader`).
"""

import sys

import keras
import numpy as np
import pytest
import sentencepiece
import tensorflow as tf

from export import client
from export import native_loader
from export import saved_model
from export import signature_names as names
from export import vlm_serving
from export.adapters import ServingOptions
from keras_moe import models
from keras_moe.models.t5 import EOS_ID
from keras_moe.models.t5 import t5_config
from keras_moe.models.vlm import VisionLanguageModel
from tests.export import export_test_utils as utils

MAX_LENGTH = 8
PROMPT_LENGTH = 24
XLA_BATCH = 2
PROMPTS = ["caption in en:", "", "what is the left digit?", "for x in"]
VISION = dict(
    image_size=(8, 16),
    patch_size=4,
    num_channels=1,
    model_dim=16,
    num_heads=2,
    hidden_dim=32,
    num_layers=2,
)


@pytest.fixture(scope="module")
def sentencepiece_model():
    return utils.train_sentencepiece()


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    model = VisionLanguageModel(
        VISION, t5_config("t5_tiny"), max_prompt_length=PROMPT_LENGTH
    )
    utils.randomize(model, seed=4)
    # A likelier end-of-sequence token, so that some outputs end early.
    embeddings = model.language_model.shared.embeddings
    scale = np.where(np.arange(128) == EOS_ID, 2.0, 1.0)[:, None]
    embeddings.assign(embeddings.numpy() * scale)
    return model


def _pixels():
    """uint8 images: 8 x 8 (padded into 8 x 16), 8 x 16 (as it is), 16 x 32
    (halved) and 8 x 16, each with its model input by NumPy."""
    rng = np.random.default_rng(1)
    small = rng.integers(0, 256, (8, 8, 1), dtype=np.uint8)
    exact = rng.integers(0, 256, (8, 16, 1), dtype=np.uint8)
    large = rng.integers(0, 256, (16, 32, 1), dtype=np.uint8)
    other = rng.integers(0, 256, (8, 16, 1), dtype=np.uint8)
    padded = np.zeros((8, 16, 1), "float32")
    padded[:, 4:12] = small / 255.0
    # Halving with bilinear sampling at half-pixel centres averages 2 x 2.
    halved = (large / 255.0).reshape(8, 2, 16, 2, 1).mean(axis=(1, 3))
    encoded = [tf.io.encode_png(x).numpy() for x in (small, exact, large)]
    # JPEG is lossy: its reference is the decoded JPEG.
    jpeg = tf.io.encode_jpeg(other, quality=95).numpy()
    encoded.append(jpeg)
    decoded = tf.io.decode_jpeg(jpeg, channels=1).numpy() / 255.0
    inputs = np.stack([padded, exact / 255.0, halved, decoded])
    return np.array(encoded, dtype=object), inputs.astype("float32")


def _prompt_ids(sentencepiece_model, prompts):
    processor = sentencepiece.SentencePieceProcessor()
    processor.LoadFromSerializedProto(sentencepiece_model)
    ids = np.zeros((len(prompts), PROMPT_LENGTH), "int32")
    for i, prompt in enumerate(prompts):
        pieces = processor.encode(prompt) + [EOS_ID]
        ids[i, : len(pieces)] = pieces
    return ids, processor


def _text(processor, tokens):
    texts = []
    for row in tokens[:, 1:].tolist():
        row = row[: row.index(EOS_ID)] if EOS_ID in row else row
        texts.append(
            processor.decode([t for t in row if 0 < t < len(processor)])
        )
    return texts


@pytest.fixture(scope="module")
def served(model, sentencepiece_model, tmp_path_factory):
    options = ServingOptions(
        max_length=MAX_LENGTH,
        xla_batch_size=XLA_BATCH,
        sentencepiece_model=sentencepiece_model,
    )
    result = saved_model.export_saved_model(
        model, tmp_path_factory.mktemp("models"), "vlm", 1, options=options
    )
    encoded, images = _pixels()
    prompts = np.array(PROMPTS, dtype=object)
    ids, _ = _prompt_ids(sentencepiece_model, PROMPTS)
    # serving_default takes any length up to P: the longest prompt's.
    length = int((ids != 0).sum(1).max())
    assert length < PROMPT_LENGTH
    ids = ids[:, :length]
    xla_ids = np.zeros((XLA_BATCH, PROMPT_LENGTH), "int32")
    xla_ids[:, :length] = ids[:XLA_BATCH]
    caption = vlm_serving.CAPTION
    ids_key = vlm_serving.PROMPT_TOKEN_IDS
    caption_inputs = {names.IMAGE_BYTES: encoded, vlm_serving.PROMPT: prompts}
    long_prompt = " ".join(["assignment statements rebind names"] * 5)
    calls = {
        "caption": (caption, caption_inputs),
        "default": (
            names.SERVING_DEFAULT,
            {names.IMAGES: images, ids_key: ids},
        ),
        "xla": (
            names.SERVING_XLA,
            {names.IMAGES: images[:XLA_BATCH], ids_key: xla_ids},
        ),
        "bad_long_prompt": (
            caption,
            {
                names.IMAGE_BYTES: encoded[:1],
                vlm_serving.PROMPT: np.array([long_prompt], dtype=object),
            },
        ),
        "bad_image_bytes": (
            caption,
            {
                names.IMAGE_BYTES: np.array([b"not an image"], dtype=object),
                vlm_serving.PROMPT: prompts[:1],
            },
        ),
        "bad_out_of_vocab": (
            names.SERVING_DEFAULT,
            {names.IMAGES: images[:1], ids_key: np.array([[500, 1]], "int32")},
        ),
        "bad_long_ids": (
            names.SERVING_DEFAULT,
            {
                names.IMAGES: images[:1],
                ids_key: np.ones((1, PROMPT_LENGTH + 1), "int32"),
            },
        ),
        "bad_image_shape": (
            names.SERVING_DEFAULT,
            {names.IMAGES: images[:, :, :8], ids_key: ids},
        ),
    }
    request = client.predict_request("vlm", caption, caption_inputs)
    job = {
        "saved_model": result.path,
        "tensorflow_text": True,
        "calls": [
            {"id": key, "signature": signature, "inputs": inputs}
            for key, (signature, inputs) in calls.items()
        ],
        "requests": [
            {"id": "request_caption", "request": request.SerializeToString()}
        ],
        "warmup": True,
    }
    outputs = utils.run_harness(tmp_path_factory.mktemp("vlm_harness"), job)
    context = dict(images=images, ids=ids, xla_ids=xla_ids)
    return result, context, outputs


def test_caption_runs_without_keras_and_matches_the_model(
    served, model, sentencepiece_model
):
    result, ctx, served_outputs = served
    assert served_outputs["blocked"] == {
        "keras": True,
        "keras_moe": True,
        "export": True,
    }
    ids, processor = _prompt_ids(sentencepiece_model, PROMPTS)
    tokens = keras.ops.convert_to_numpy(
        model.generate(ctx["images"], ids, MAX_LENGTH)
    )
    expected = _text(processor, tokens)
    assert len(set(expected)) > 1 and any(expected)  # not degenerate
    for key in ("caption", "request_caption"):
        texts = served_outputs["outputs"][key][names.OUTPUT_TEXT]
        assert [t.decode("utf-8") for t in texts] == expected, key


def test_token_signatures_match_the_model(served, model):
    _, ctx, served_outputs = served
    outputs = served_outputs["outputs"]
    for key, images, ids in (
        ("default", ctx["images"], ctx["ids"]),
        ("xla", ctx["images"][:XLA_BATCH], ctx["xla_ids"]),
    ):
        expected = model.generate(images, ids, MAX_LENGTH)
        tokens = outputs[key][names.OUTPUT_TOKEN_IDS]
        assert tokens.dtype == np.int32
        np.testing.assert_array_equal(
            tokens, keras.ops.convert_to_numpy(expected), err_msg=key
        )
    tokens = outputs["default"][names.OUTPUT_TOKEN_IDS]
    assert (tokens[:, 1:] == EOS_ID).any()  # the end-of-sequence path runs
    assert "warmup_0" in outputs


def test_signatures_through_the_c_api(served, model, sentencepiece_model):
    result, ctx, _ = served
    libraries = native_loader.tf_text_libraries()
    ids_key = vlm_serving.PROMPT_TOKEN_IDS
    for signature, images, ids in (
        (names.SERVING_DEFAULT, ctx["images"], ctx["ids"]),
        (names.SERVING_XLA, ctx["images"][:XLA_BATCH], ctx["xla_ids"]),
    ):
        outputs = native_loader.run_signature(
            result.path,
            signature,
            {names.IMAGES: images, ids_key: ids},
            libraries=libraries,
        )
        np.testing.assert_array_equal(
            outputs[names.OUTPUT_TOKEN_IDS],
            keras.ops.convert_to_numpy(model.generate(images, ids, MAX_LENGTH)),
            err_msg=signature,
        )
    encoded, _ = _pixels()
    outputs = native_loader.run_signature(
        result.path,
        vlm_serving.CAPTION,
        {
            names.IMAGE_BYTES: encoded,
            vlm_serving.PROMPT: np.array(PROMPTS, dtype=object),
        },
        libraries=libraries,
    )
    ids, processor = _prompt_ids(sentencepiece_model, PROMPTS)
    expected = _text(
        processor,
        keras.ops.convert_to_numpy(
            model.generate(ctx["images"], ids, MAX_LENGTH)
        ),
    )
    texts = [text.decode("utf-8") for text in outputs[names.OUTPUT_TEXT]]
    assert texts == expected


def test_bad_requests_fail_with_clear_errors(served):
    _, _, served_outputs = served
    errors = served_outputs["errors"]
    assert set(errors) == {
        "bad_long_prompt",
        "bad_image_bytes",
        "bad_out_of_vocab",
        "bad_long_ids",
        "bad_image_shape",
    }
    assert f"max_prompt_length={PROMPT_LENGTH}" in errors["bad_long_prompt"]
    assert f"max_prompt_length={PROMPT_LENGTH}" in errors["bad_long_ids"]
    assert "must lie in [0, 128)" in errors["bad_out_of_vocab"]


def test_metadata_and_signature_specs(served):
    result, _, _ = served
    metadata = saved_model.read_metadata(result.path)
    assert metadata["model_class"] == "VisionLanguageModel"
    specs = metadata["signatures"]
    assert set(specs) == {
        names.SERVING_DEFAULT,
        vlm_serving.CAPTION,
        names.SERVING_XLA,
    }
    assert specs[vlm_serving.CAPTION]["inputs"] == {
        names.IMAGE_BYTES: ["string", [-1]],
        vlm_serving.PROMPT: ["string", [-1]],
    }
    assert specs[names.SERVING_XLA]["inputs"][names.IMAGES] == [
        "float32",
        [XLA_BATCH, 8, 16, 1],
    ]
    assert "keeping the aspect ratio" in specs[vlm_serving.CAPTION]["doc"]


def test_upcycled_model_exports_without_token_drops(model):
    """The adapter names the three MoE config keys: the exporter rebuilds
    every MoE block with no capacity limit, weights copied."""
    import keras_moe

    moe = keras_moe.upcycle(model, num_experts=4)
    rebuilt = models.with_eval_capacity_factor(moe, None)
    layers = models.moe_layers(rebuilt)
    assert len(layers) == 3
    assert all(layer.eval_capacity_factor is None for layer in layers)
    adapter = vlm_serving.VlmAdapter(rebuilt, ServingOptions())
    assert adapter.static_prompt  # expert choice groups by sequence
    for name, variable in moe.canonical_variables().items():
        np.testing.assert_array_equal(
            variable.numpy(), rebuilt.canonical_variables()[name].numpy()
        )


def test_adapter_rejects_a_foreign_vocabulary(model):
    big = utils.train_sentencepiece(vocab_size=200)
    with pytest.raises(ValueError, match="larger than the model's"):
        vlm_serving.VlmAdapter(model, ServingOptions(sentencepiece_model=big))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
