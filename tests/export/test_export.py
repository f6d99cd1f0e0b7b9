"""Exported SavedModels, called as TF Serving calls them, against Keras.

Each export is loaded once, in a fresh process where `keras`, `keras_moe`
and `export` cannot be imported (`serving_harness.py`); every signature is
called there (directly, through `PredictRequest` protos built by
`export.client`, through decoded REST bodies, from 8 threads at once, and
with bad inputs) and the outputs are compared here with the in-process Keras
model: probabilities within 1e-5, generated token ids and text identical.

Each export is also run the way TensorFlow Serving runs it, by TensorFlow's
C API loader in a process with no Python at all (`export.native_loader`):
`serving_default`, `serving_xla` and the byte/text signatures, with the
tensor names read from the SavedModel's own SignatureDefs.
"""

import base64
import json
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import sentencepiece
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

import keras_moe
from export import client
from export import native_loader
from export import saved_model
from export import signature_names as names
from export.adapters import ServingOptions
from keras_moe import models
from keras_moe.models.t5 import EOS_ID
from keras_moe.models.t5 import T5
from keras_moe.models.vit import ViT
from tests.export import export_test_utils as utils

TOLERANCE = 1e-5
SAVED_MODEL_CLI = pathlib.Path(sys.executable).with_name("saved_model_cli")
VIT_OPTIONS = {
    # uint8 serving_default, normalised pixels.
    "dense": ServingOptions(
        top_k=3,
        image_dtype="uint8",
        image_mean=(0.5, 0.4, 0.3),
        image_std=(0.25,),
        xla_batch_size=4,
    ),
    # float32 serving_default, pixels in [0, 1].
    "moe": ServingOptions(top_k=3, image_dtype="float32", xla_batch_size=4),
}
T5_MAX_LENGTH = 10
T5_INPUT_LENGTH = 12
T5_XLA_BATCH = 3
TEXTS = [
    "The for statement is used to iterate over the elements of a sequence",
    "",
    "while loops",
    # Longer than T5_INPUT_LENGTH pieces: truncated, EOS kept.
    " ".join(["assignment statements rebind names to objects"] * 4),
]


# ----------------------------------------------------------------- models


@pytest.fixture(scope="module")
def export_base(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def vit_models():
    keras.utils.set_random_seed(0)
    dense = utils.randomize(ViT.from_architecture("vit_tiny"), seed=0)
    # Paper recipe: block 1 becomes expert-choice MoE with capacity factor 2.
    moe = utils.randomize(keras_moe.upcycle(dense, num_experts=4), seed=1)
    return {"dense": dense, "moe": moe}


@pytest.fixture(scope="module")
def sentencepiece_model():
    return utils.train_sentencepiece()


@pytest.fixture(scope="module")
def t5_models():
    keras.utils.set_random_seed(0)
    dense = utils.randomize(T5.from_architecture("t5_tiny"), seed=2)
    # A likelier end-of-sequence token, so that some sequences end early.
    embeddings = dense.shared.embeddings
    embeddings.assign(
        embeddings.numpy()
        * np.where(np.arange(128) == EOS_ID, 2.5, 1.0)[:, None]
    )
    moe = utils.randomize(keras_moe.upcycle(dense, num_experts=4), seed=3)
    return {"dense": dense, "moe": moe}


# --------------------------------------------------------------- references


def _classify(model, images, top_k):
    probabilities = utils.softmax(model(images, training=False))
    return probabilities, np.sort(probabilities, -1)[:, ::-1][:, :top_k]


def _pixels(images_uint8, options):
    scaled = images_uint8.astype("float32") / 255.0
    mean = np.broadcast_to(np.float32(options.image_mean), (3,))
    std = np.broadcast_to(np.float32(options.image_std), (3,))
    return (scaled - mean) / std


def _assert_classified(outputs, model, images, top_k):
    """Outputs match Keras: probabilities, and top-k ids whose reference
    probabilities are the k largest (ties may come in any order)."""
    probabilities, top = _classify(model, images, top_k)
    assert set(outputs) == {
        names.PROBABILITIES,
        names.TOP_K_CLASS_IDS,
        names.TOP_K_PROBABILITIES,
    }
    np.testing.assert_allclose(
        outputs[names.PROBABILITIES], probabilities, rtol=0, atol=TOLERANCE
    )
    ids = outputs[names.TOP_K_CLASS_IDS]
    assert ids.dtype == np.int32 and ids.shape == top.shape
    np.testing.assert_allclose(
        np.take_along_axis(probabilities, ids.astype(int), -1),
        top,
        rtol=0,
        atol=TOLERANCE,
    )
    np.testing.assert_allclose(
        outputs[names.TOP_K_PROBABILITIES], top, rtol=0, atol=TOLERANCE
    )


def _generate(model, token_ids):
    return keras.ops.convert_to_numpy(
        model.generate(np.asarray(token_ids, "int32"), T5_MAX_LENGTH)
    )


def _reference_text(model, sentencepiece_model, texts):
    processor = sentencepiece.SentencePieceProcessor(
        model_proto=sentencepiece_model
    )
    encoded = [
        processor.encode(text)[: T5_INPUT_LENGTH - 1] + [EOS_ID]
        for text in texts
    ]
    ids = np.zeros((len(texts), max(map(len, encoded))), "int32")
    for row, pieces in enumerate(encoded):
        ids[row, : len(pieces)] = pieces
    decoded = []
    for row in _generate(model, ids):
        row = list(row[1:])
        row = row[: row.index(EOS_ID)] if EOS_ID in row else row
        row = [i for i in row if 0 < i < processor.vocab_size()]
        decoded.append(processor.decode(row).encode("utf-8"))
    return np.array(decoded, dtype=object)


def _decode_rest(body, dtypes):
    """Decodes a REST predict body as TF Serving does (reference decoder)."""

    def value(item):
        if isinstance(item, dict):
            return base64.b64decode(item["b64"])
        if isinstance(item, list):
            return [value(v) for v in item]
        return item.encode("utf-8") if isinstance(item, str) else item

    body = json.loads(json.dumps(body))
    if "instances" in body:
        columns = {
            name: [value(row[name]) for row in body["instances"]]
            for name in dtypes
        }
    else:
        columns = {name: value(body["inputs"][name]) for name in dtypes}
    return {
        name: np.array(
            column, dtype=object if dtypes[name] == "string" else dtypes[name]
        )
        for name, column in columns.items()
    }


# ----------------------------------------------------------------- exports


def _images(n, seed, height=32, width=32):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module", params=["dense", "moe"])
def vit_served(request, vit_models, export_base, tmp_path_factory):
    """(kind, ExportResult, inputs, harness result) of a ViT export."""
    kind = request.param
    options = VIT_OPTIONS[kind]
    result = saved_model.export_saved_model(
        vit_models[kind], export_base, f"vit_{kind}", version=1, options=options
    )
    default_dtype = options.image_dtype
    pixels = _images(5, seed=10)
    floats = pixels.astype("float32") / 255.0
    resized = np.random.default_rng(11).uniform(size=(3, 40, 24, 3))
    other_size = _images(1, seed=12, height=48, width=40)[0]
    pngs = [tf.io.encode_png(image).numpy() for image in pixels[:2]]
    pngs.append(tf.io.encode_png(other_size).numpy())
    jpegs = [tf.io.encode_jpeg(image).numpy() for image in pixels[:3]]
    default_images = pixels if default_dtype == "uint8" else floats
    xla_images = default_images[:4]
    inputs = {
        "default": (names.SERVING_DEFAULT, {names.IMAGES: default_images}),
        "uint8": (names.PREDICT_IMAGES_UINT8, {names.IMAGES: pixels}),
        "float32": (names.PREDICT_IMAGES_FLOAT32, {names.IMAGES: floats}),
        "resized": (
            names.PREDICT_IMAGES_FLOAT32,
            {names.IMAGES: resized.astype("float32")},
        ),
        "png": (
            names.PREDICT_IMAGE_BYTES,
            {names.IMAGE_BYTES: np.array(pngs, dtype=object)},
        ),
        "jpeg": (
            names.PREDICT_IMAGE_BYTES,
            {names.IMAGE_BYTES: np.array(jpegs, dtype=object)},
        ),
        "xla": (names.SERVING_XLA, {names.IMAGES: xla_images}),
    }
    bad = {
        "bad_dtype": (
            names.PREDICT_IMAGES_UINT8,
            {names.IMAGES: floats.astype("float64")},
        ),
        "bad_rank": (names.PREDICT_IMAGES_UINT8, {names.IMAGES: pixels[0]}),
        "bad_channels": (
            names.PREDICT_IMAGES_FLOAT32,
            {names.IMAGES: np.zeros((1, 32, 32, 4), "float32")},
        ),
        "bad_bytes": (
            names.PREDICT_IMAGE_BYTES,
            {names.IMAGE_BYTES: np.array([b"not an image"], dtype=object)},
        ),
        "bad_xla_batch": (names.SERVING_XLA, {names.IMAGES: default_images}),
    }
    name = result.model_name
    requests = {
        "request_default": (
            client.images_request(name, default_images),
            {names.IMAGES: default_images},
        ),
        "request_uint8": (
            client.images_request(
                name, pixels, names.PREDICT_IMAGES_UINT8, version=1
            ),
            {names.IMAGES: pixels},
        ),
        "request_float32": (
            client.images_request(name, floats, names.PREDICT_IMAGES_FLOAT32),
            {names.IMAGES: floats},
        ),
        "request_bytes": (
            client.image_bytes_request(name, pngs),
            {names.IMAGE_BYTES: np.array(pngs, dtype=object)},
        ),
        "request_xla": (
            client.images_request(name, xla_images, names.SERVING_XLA),
            {names.IMAGES: xla_images},
        ),
    }
    rest = {}
    for fmt in (client.ROW_FORMAT, client.COLUMNAR_FORMAT):
        rest[f"rest_{fmt}_default"] = (
            names.SERVING_DEFAULT,
            _decode_rest(
                client.rest_body({names.IMAGES: default_images}, format=fmt),
                {names.IMAGES: default_dtype},
            ),
        )
        rest[f"rest_{fmt}_bytes"] = (
            names.PREDICT_IMAGE_BYTES,
            _decode_rest(
                client.rest_body(
                    {names.IMAGE_BYTES: pngs},
                    names.PREDICT_IMAGE_BYTES,
                    format=fmt,
                ),
                {names.IMAGE_BYTES: "string"},
            ),
        )
    calls = [
        {"id": key, "signature": signature, "inputs": values}
        for key, (signature, values) in {**inputs, **bad, **rest}.items()
    ]
    # A good call after the bad ones: the loaded model still serves.
    calls.append(
        {
            "id": "after_bad",
            "signature": names.PREDICT_IMAGES_UINT8,
            "inputs": {names.IMAGES: pixels},
        }
    )
    job = {
        "saved_model": result.path,
        "calls": calls,
        "requests": [
            {"id": key, "request": request.SerializeToString()}
            for key, (request, _) in requests.items()
        ],
        "warmup": True,
        "concurrency": {
            "signature": names.SERVING_DEFAULT,
            "inputs": [
                {names.IMAGES: default_images[i : i + 2]} for i in range(4)
            ]
            + [{names.IMAGES: xla_images}],
            "threads": 8,
            "requests_per_thread": 50,
        },
    }
    served = utils.run_harness(tmp_path_factory.mktemp(f"vit_{kind}"), job)
    context = dict(
        pixels=pixels,
        floats=floats,
        resized=resized.astype("float32"),
        other_size=other_size,
        jpegs=jpegs,
        default_images=default_images,
        xla_images=xla_images,
        requests=requests,
    )
    return kind, result, context, served


def test_vit_export_runs_without_keras(vit_served):
    _, _, _, served = vit_served
    assert served["blocked"] == {
        "keras": True,
        "keras_moe": True,
        "export": True,
    }


def test_vit_signatures_match_keras(vit_served):
    kind, result, ctx, served = vit_served
    model, options = result.model, VIT_OPTIONS[kind]
    outputs = served["outputs"]
    k = options.top_k
    normalised = _pixels(ctx["pixels"], options)
    default = normalised if options.image_dtype == "uint8" else ctx["floats"]
    _assert_classified(outputs["default"], model, default, k)
    _assert_classified(outputs["uint8"], model, normalised, k)
    _assert_classified(outputs["float32"], model, ctx["floats"], k)
    _assert_classified(outputs["xla"], model, default[:4], k)
    _assert_classified(outputs["after_bad"], model, normalised, k)


def test_vit_signatures_through_the_c_api(vit_served):
    kind, result, ctx, _ = vit_served
    model, options = result.model, VIT_OPTIONS[kind]
    k = options.top_k
    normalised = _pixels(ctx["pixels"], options)
    default = normalised if options.image_dtype == "uint8" else ctx["floats"]
    pngs = [tf.io.encode_png(image).numpy() for image in ctx["pixels"][:2]]
    for signature, inputs, expected in (
        (names.SERVING_DEFAULT, ctx["default_images"], default),
        (names.SERVING_XLA, ctx["xla_images"], default[:4]),
        (names.PREDICT_IMAGES_UINT8, ctx["pixels"], normalised),
    ):
        outputs = native_loader.run_signature(
            result.path, signature, {names.IMAGES: inputs}
        )
        _assert_classified(outputs, model, expected, k)
    outputs = native_loader.run_signature(
        result.path,
        names.PREDICT_IMAGE_BYTES,
        {names.IMAGE_BYTES: np.array(pngs, dtype=object)},
    )
    _assert_classified(outputs, model, normalised[:2], k)


def test_vit_resizes_other_sizes(vit_served):
    kind, result, ctx, served = vit_served
    k = VIT_OPTIONS[kind].top_k
    expected = tf.image.resize(ctx["resized"], (32, 32)).numpy()
    _assert_classified(served["outputs"]["resized"], result.model, expected, k)


def test_vit_decodes_png_and_jpeg(vit_served):
    kind, result, ctx, served = vit_served
    options = VIT_OPTIONS[kind]
    pngs = np.concatenate(
        [
            _pixels(ctx["pixels"][:2], options),
            tf.image.resize(
                _pixels(ctx["other_size"][None], options), (32, 32)
            ).numpy(),
        ]
    )
    _assert_classified(served["outputs"]["png"], result.model, pngs, 3)
    jpegs = np.stack([tf.io.decode_jpeg(data).numpy() for data in ctx["jpegs"]])
    _assert_classified(
        served["outputs"]["jpeg"], result.model, _pixels(jpegs, options), 3
    )


def test_vit_predict_requests_and_rest_bodies(vit_served):
    kind, result, ctx, served = vit_served
    outputs = served["outputs"]
    for key, (request, sent) in ctx["requests"].items():
        # What the server decodes is what the client meant to send.
        assert request.model_spec.name == result.model_name
        received = client.request_inputs(request)
        assert received.keys() == sent.keys()
        for name, value in received.items():
            assert value.dtype == np.asarray(sent[name]).dtype or (
                name == names.IMAGE_BYTES
            )
            np.testing.assert_array_equal(value, np.asarray(sent[name]))
        assert key in outputs, served["errors"].get(key)
    same = {
        "request_default": "default",
        "request_uint8": "uint8",
        "request_float32": "float32",
        "request_xla": "xla",
        "rest_instances_default": "default",
        "rest_inputs_default": "default",
    }
    for key, reference in same.items():
        for name in outputs[reference]:
            np.testing.assert_array_equal(
                outputs[key][name], outputs[reference][name], err_msg=key
            )
    for key in ("request_bytes", "rest_instances_bytes", "rest_inputs_bytes"):
        for name in outputs["png"]:
            np.testing.assert_array_equal(
                outputs[key][name], outputs["png"][name], err_msg=key
            )


def test_vit_warmup_request_replays(vit_served):
    _, _, _, served = vit_served
    assert "warmup_0" in served["outputs"], served["errors"]


def test_vit_concurrent_requests_equal_single_threaded(vit_served):
    _, _, _, served = vit_served
    assert served["concurrency"] == {
        "calls": 400,
        "mismatches": 0,
        "exceptions": 0,
    }


def test_vit_bad_inputs_fail_in_the_signature(vit_served):
    _, _, _, served = vit_served
    errors = served["errors"]
    assert set(errors) == {
        "bad_dtype",
        "bad_rank",
        "bad_channels",
        "bad_bytes",
        "bad_xla_batch",
    }
    assert "uint8" in errors["bad_dtype"]
    assert "Unknown image file format" in errors["bad_bytes"]
    for message in errors.values():
        assert message.split(":")[0] in (
            "InvalidArgumentError",
            "TypeError",
            "ValueError",
        ), message


def test_vit_moe_export_drops_no_token_by_default(vit_models, vit_served):
    kind, result, ctx, served = vit_served
    layers = models.moe_layers(result.model)
    if kind == "dense":
        assert result.model is vit_models["dense"] and not layers
        return
    assert layers and all(
        layer.eval_capacity_factor is None for layer in layers
    )
    # The original model (capacity factor 2, 4 experts) drops tokens.
    original = models.moe_layers(vit_models["moe"])
    assert [layer.eval_capacity_factor for layer in original] == [2.0]
    dropped, _ = _classify(vit_models["moe"], ctx["floats"], 3)
    assert (
        np.abs(served["outputs"]["float32"]["probabilities"] - dropped).max()
        > 1e-4
    )
    metadata = saved_model.read_metadata(result.path)
    assert metadata["eval_capacity_factors"] == ["None"]
    assert metadata["capacity"].startswith("MoE blocks drop no token")
    assert metadata["capacity"] in result.signatures[names.SERVING_DEFAULT]


def test_vit_moe_export_can_keep_the_capacity_factor(
    vit_models, export_base, tmp_path
):
    model = vit_models["moe"]
    result = saved_model.export_saved_model(
        model,
        export_base,
        "vit_moe_keep",
        version=3,
        options=VIT_OPTIONS["moe"],
        eval_capacity_factor=saved_model.KEEP,
        warmup=False,
    )
    assert result.model is model
    assert (
        "factors ['2.0']" in saved_model.read_metadata(result.path)["capacity"]
    )
    images = _images(3, seed=20).astype("float32") / 255.0
    served = utils.run_harness(
        tmp_path,
        {
            "saved_model": result.path,
            "calls": [
                {
                    "id": "float32",
                    "signature": names.PREDICT_IMAGES_FLOAT32,
                    "inputs": {names.IMAGES: images},
                }
            ],
        },
    )
    _assert_classified(served["outputs"]["float32"], model, images, 3)


def test_with_eval_capacity_factor_rebuilds_and_copies(vit_models):
    moe = vit_models["moe"]
    rebuilt = models.with_eval_capacity_factor(moe, 1.5)
    assert rebuilt is not moe
    assert [
        layer.eval_capacity_factor for layer in models.moe_layers(rebuilt)
    ] == [1.5]
    assert [layer.eval_capacity_factor for layer in models.moe_layers(moe)] == [
        2.0
    ]
    for source, target in zip(moe.weights, rebuilt.weights):
        assert source.path == target.path
        np.testing.assert_array_equal(source.numpy(), target.numpy())
    assert models.with_eval_capacity_factor(moe, 2.0) is moe
    with pytest.raises(ValueError):
        models.with_eval_capacity_factor(moe, -1.0)


def test_saved_model_cli_show_and_run(vit_served, tmp_path):
    kind, result, ctx, served = vit_served
    if kind != "dense":
        pytest.skip("one export is enough")
    cli = str(SAVED_MODEL_CLI)
    shown = subprocess.run(
        [cli, "show", "--all", "--dir", result.path],
        capture_output=True,
        text=True,
        check=True,
        env=utils.subprocess_env(),
    ).stdout
    for signature in result.signatures:
        assert f"signature_def['{signature}']" in shown
    assert "inputs['images'] tensor_info:\n        dtype: DT_UINT8" in shown
    assert (
        "inputs['image_bytes'] tensor_info:\n        dtype: DT_STRING" in shown
    )
    np.save(tmp_path / "images.npy", ctx["pixels"])
    subprocess.run(
        [
            cli,
            "run",
            "--dir",
            result.path,
            "--tag_set",
            "serve",
            "--signature_def",
            names.SERVING_DEFAULT,
            "--inputs",
            f"images={tmp_path / 'images.npy'}",
            "--outdir",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        check=True,
        env=utils.subprocess_env(),
    )
    outputs = {
        name: np.load(tmp_path / "out" / f"{name}.npy")
        for name in served["outputs"]["default"]
    }
    _assert_classified(
        outputs, result.model, _pixels(ctx["pixels"], VIT_OPTIONS[kind]), 3
    )


def test_xla_function_is_aliased_for_tpu(vit_served):
    _, result, _, _ = vit_served
    proto = saved_model_pb2.SavedModel()
    with open(f"{result.path}/saved_model.pb", "rb") as f:
        proto.ParseFromString(f.read())
    graph = proto.meta_graphs[0]
    aliases = dict(graph.meta_info_def.function_aliases)
    assert aliases and set(aliases.values()) == {names.TPU_FUNCTION_ALIAS}
    library = {f.signature.name: f for f in graph.graph_def.library.function}
    for function_name in aliases:
        assert library[function_name].attr["_XlaMustCompile"].b
    xla = graph.signature_def[names.SERVING_XLA]
    assert [d.size for d in xla.inputs[names.IMAGES].tensor_shape.dim] == [
        4,
        32,
        32,
        3,
    ]


# ------------------------------------------------------------------------ T5


@pytest.fixture(scope="module", params=["dense", "moe"])
def t5_served(
    request, t5_models, sentencepiece_model, export_base, tmp_path_factory
):
    kind = request.param
    options = ServingOptions(
        max_length=T5_MAX_LENGTH,
        max_input_length=T5_INPUT_LENGTH,
        xla_batch_size=T5_XLA_BATCH,
        sentencepiece_model=sentencepiece_model,
    )
    result = saved_model.export_saved_model(
        t5_models[kind], export_base, f"t5_{kind}", version=1, options=options
    )
    rng = np.random.default_rng(30)
    # MoE encoder blocks grouping by sequence need a static length: that
    # export takes ids padded to max_input_length.
    length = 9 if kind == "dense" else T5_INPUT_LENGTH
    assert result.adapter.encoder_length == (
        None if kind == "dense" else T5_INPUT_LENGTH
    )
    ids = np.zeros((4, length), "int32")
    ids[:, :9] = rng.integers(2, 128, (4, 9))
    ids[:, 8] = EOS_ID
    ids[1, 5:] = 0  # right padding
    ids[1, 4] = EOS_ID
    ids[2, 3:] = 0
    ids[2, 2] = EOS_ID
    longer = rng.integers(2, 128, (2, 12)).astype("int32")
    xla_ids = np.zeros((T5_XLA_BATCH, T5_INPUT_LENGTH), "int32")
    xla_ids[:, :9] = ids[:T5_XLA_BATCH, :9]
    texts = np.array(TEXTS, dtype=object)
    calls = {
        "ids": (names.SERVING_DEFAULT, {names.ENCODER_TOKEN_IDS: ids}),
        "ids_longer": (
            names.SERVING_DEFAULT,
            {names.ENCODER_TOKEN_IDS: longer},
        ),
        "text": (names.GENERATE_TEXT, {names.TEXT: texts}),
        "xla": (names.SERVING_XLA, {names.ENCODER_TOKEN_IDS: xla_ids}),
        "bad_out_of_vocab": (
            names.SERVING_DEFAULT,
            {names.ENCODER_TOKEN_IDS: np.array([[500, 1]], "int32")},
        ),
        "bad_negative": (
            names.SERVING_DEFAULT,
            {names.ENCODER_TOKEN_IDS: np.array([[-3, 1]], "int32")},
        ),
        "bad_dtype": (
            names.SERVING_DEFAULT,
            {names.ENCODER_TOKEN_IDS: ids.astype("float32")},
        ),
        "bad_rank": (
            names.SERVING_DEFAULT,
            {names.ENCODER_TOKEN_IDS: ids[0]},
        ),
        "bad_text_dtype": (names.GENERATE_TEXT, {names.TEXT: ids[:, 0]}),
        "bad_xla_shape": (
            names.SERVING_XLA,
            {names.ENCODER_TOKEN_IDS: ids[:, :9]},
        ),
    }
    name = result.model_name
    requests = {
        "request_ids": client.token_ids_request(name, ids),
        "request_xla": client.token_ids_request(
            name, xla_ids, names.SERVING_XLA
        ),
        "request_text": client.text_request(name, TEXTS),
    }
    for fmt in (client.ROW_FORMAT, client.COLUMNAR_FORMAT):
        calls[f"rest_{fmt}_text"] = (
            names.GENERATE_TEXT,
            _decode_rest(
                client.rest_body({names.TEXT: TEXTS}, names.GENERATE_TEXT, fmt),
                {names.TEXT: "string"},
            ),
        )
        calls[f"rest_{fmt}_ids"] = (
            names.SERVING_DEFAULT,
            _decode_rest(
                client.rest_body({names.ENCODER_TOKEN_IDS: ids}, format=fmt),
                {names.ENCODER_TOKEN_IDS: "int32"},
            ),
        )
    job = {
        "saved_model": result.path,
        "tensorflow_text": True,
        "calls": [
            {"id": key, "signature": signature, "inputs": values}
            for key, (signature, values) in calls.items()
        ]
        + [
            {
                "id": "after_bad",
                "signature": names.SERVING_DEFAULT,
                "inputs": {names.ENCODER_TOKEN_IDS: ids},
            }
        ],
        "requests": [
            {"id": key, "request": request.SerializeToString()}
            for key, request in requests.items()
        ],
        "warmup": True,
        "concurrency": {
            "signature": names.SERVING_DEFAULT,
            "inputs": [
                {names.ENCODER_TOKEN_IDS: ids[i : i + 1]} for i in range(4)
            ]
            + [
                {names.ENCODER_TOKEN_IDS: ids},
                {names.ENCODER_TOKEN_IDS: longer},
            ],
            "threads": 8,
            "requests_per_thread": 50,
        },
    }
    served = utils.run_harness(tmp_path_factory.mktemp(f"t5_{kind}"), job)
    context = dict(ids=ids, longer=longer, xla_ids=xla_ids, requests=requests)
    return kind, result, context, served


def test_t5_generation_matches_keras(t5_served):
    kind, result, ctx, served = t5_served
    outputs = served["outputs"]
    assert served["blocked"]["keras"] and served["blocked"]["keras_moe"]
    for key, ids in (
        ("ids", ctx["ids"]),
        ("ids_longer", ctx["longer"]),
        ("xla", ctx["xla_ids"]),
        ("after_bad", ctx["ids"]),
        ("request_ids", ctx["ids"]),
        ("request_xla", ctx["xla_ids"]),
        ("rest_instances_ids", ctx["ids"]),
        ("rest_inputs_ids", ctx["ids"]),
    ):
        tokens = outputs[key][names.OUTPUT_TOKEN_IDS]
        assert tokens.dtype == np.int32, key
        np.testing.assert_array_equal(
            tokens, _generate(result.model, ids), err_msg=key
        )
    if kind == "dense":
        # Some sequences end early: the EOS paths are exercised.
        tokens = outputs["ids"][names.OUTPUT_TOKEN_IDS]
        assert (tokens[:, 1:] == EOS_ID).any()
        assert not (tokens[:, 1:] == EOS_ID).any(axis=1).all()


def test_t5_moe_export_has_no_capacity_limit(t5_served, t5_models):
    kind, result, _, _ = t5_served
    layers = models.moe_layers(result.model)
    if kind == "dense":
        assert not layers
    else:
        assert len(layers) == 2
        assert all(layer.eval_capacity_factor is None for layer in layers)


def test_t5_text_signature_matches_keras(t5_served, sentencepiece_model):
    _, result, _, served = t5_served
    expected = _reference_text(result.model, sentencepiece_model, TEXTS)
    for key in (
        "text",
        "request_text",
        "rest_instances_text",
        "rest_inputs_text",
    ):
        assert list(served["outputs"][key][names.OUTPUT_TEXT]) == list(
            expected
        ), key


def test_t5_signatures_through_the_c_api(t5_served, sentencepiece_model):
    _, result, ctx, _ = t5_served
    # The export's text signature uses tf-text's SentencePiece ops; a
    # server built with those ops has them linked in: load their libraries
    # (the whole graph is loaded whichever signature runs).
    libraries = native_loader.tf_text_libraries()
    for signature, ids in (
        (names.SERVING_DEFAULT, ctx["ids"]),
        (names.SERVING_XLA, ctx["xla_ids"]),
    ):
        outputs = native_loader.run_signature(
            result.path,
            signature,
            {names.ENCODER_TOKEN_IDS: ids},
            libraries=libraries,
        )
        tokens = outputs[names.OUTPUT_TOKEN_IDS]
        assert tokens.dtype == np.int32, signature
        np.testing.assert_array_equal(
            tokens, _generate(result.model, ids), err_msg=signature
        )
    outputs = native_loader.run_signature(
        result.path,
        names.GENERATE_TEXT,
        {names.TEXT: np.array(TEXTS, dtype=object)},
        libraries=libraries,
    )
    expected = _reference_text(result.model, sentencepiece_model, TEXTS)
    assert list(outputs[names.OUTPUT_TEXT]) == list(expected)


def test_t5_warmup_and_concurrency(t5_served):
    _, _, _, served = t5_served
    assert "warmup_0" in served["outputs"], served["errors"]
    assert served["concurrency"] == {
        "calls": 400,
        "mismatches": 0,
        "exceptions": 0,
    }


def test_t5_bad_inputs_fail_in_the_signature(t5_served):
    _, _, _, served = t5_served
    errors = served["errors"]
    assert set(errors) == {
        "bad_out_of_vocab",
        "bad_negative",
        "bad_dtype",
        "bad_rank",
        "bad_text_dtype",
        "bad_xla_shape",
    }
    assert "must lie in [0, 128)" in errors["bad_out_of_vocab"]
    assert "must lie in [0, 128)" in errors["bad_negative"]
    for message in errors.values():
        assert message.split(":")[0] in (
            "InvalidArgumentError",
            "TypeError",
            "ValueError",
        ), message


def test_t5_signatures_and_metadata(t5_served):
    kind, result, _, _ = t5_served
    length = -1 if kind == "dense" else T5_INPUT_LENGTH
    metadata = saved_model.read_metadata(result.path)
    assert metadata["model_class"] == "T5"
    specs = metadata["signatures"]
    assert set(specs) == {
        names.SERVING_DEFAULT,
        names.GENERATE_TEXT,
        names.SERVING_XLA,
    }
    assert specs[names.SERVING_DEFAULT]["inputs"] == {
        names.ENCODER_TOKEN_IDS: ["int32", [-1, length]]
    }
    assert specs[names.SERVING_DEFAULT]["outputs"] == {
        names.OUTPUT_TOKEN_IDS: ["int32", [-1, T5_MAX_LENGTH]]
    }
    assert specs[names.SERVING_XLA]["inputs"] == {
        names.ENCODER_TOKEN_IDS: ["int32", [T5_XLA_BATCH, T5_INPUT_LENGTH]]
    }
    assert specs[names.GENERATE_TEXT]["outputs"] == {
        names.OUTPUT_TEXT: ["string", [-1]]
    }
    assert "tf-text" in specs[names.GENERATE_TEXT]["doc"] or (
        "TensorFlow Text" in specs[names.GENERATE_TEXT]["doc"]
    )


def test_t5_text_decoding_cuts_at_eos_and_drops_unknown_ids(
    t5_served, sentencepiece_model
):
    kind, result, _, _ = t5_served
    if kind != "dense":
        pytest.skip("one export is enough")
    processor = sentencepiece.SentencePieceProcessor(
        model_proto=sentencepiece_model
    )
    assert processor.vocab_size() == 120
    tokens = tf.constant(
        [
            # start, pieces, an id past the SentencePiece vocabulary, EOS,
            # then ids that must not appear.
            [0, 40, 125, 41, 1, 50, 51],
            [0, 7, 8, 9, 10, 11, 12],
            [0, 1, 0, 0, 0, 0, 0],
        ],
        tf.int32,
    )
    decoded = result.adapter.decode_text(tokens).numpy()
    expected = [
        processor.decode([40, 41]),
        processor.decode([7, 8, 9, 10, 11, 12]),
        "",
    ]
    assert [text.decode("utf-8") for text in decoded] == expected
    encoded = result.adapter.encode_text(tf.constant(TEXTS)).numpy()
    assert encoded.shape == (len(TEXTS), T5_INPUT_LENGTH)
    assert list(encoded[1]) == [EOS_ID] + [0] * (T5_INPUT_LENGTH - 1)
    assert encoded[3, -1] == EOS_ID
    assert list(encoded[3, :-1]) == processor.encode(TEXTS[3])[:11]


def test_t5_beam_search_signature(export_base):
    # num_beams > 1 adds a beam-search signature, equal to T5.generate with
    # the same options, in Python and through the C API. Larger random
    # weights than the other T5 exports', so that the beams matter.
    keras.utils.set_random_seed(0)
    model = utils.randomize(T5.from_architecture("t5_tiny"), seed=7, scale=1.0)
    options = ServingOptions(
        max_length=T5_MAX_LENGTH,
        max_input_length=T5_INPUT_LENGTH,
        xla_batch_size=T5_XLA_BATCH,
        num_beams=3,
        length_penalty=0.5,
    )
    result = saved_model.export_saved_model(
        model, export_base, "t5_beams", version=1, options=options
    )
    assert names.GENERATE_BEAM_SEARCH in result.signatures
    ids = np.random.default_rng(31).integers(2, 128, (3, 7)).astype("int32")
    ids[:, -1] = EOS_ID
    expected = keras.ops.convert_to_numpy(
        model.generate(ids, T5_MAX_LENGTH, num_beams=3, length_penalty=0.5)
    )
    greedy = keras.ops.convert_to_numpy(model.generate(ids, T5_MAX_LENGTH))
    loaded = tf.saved_model.load(result.path)
    served = loaded.signatures[names.GENERATE_BEAM_SEARCH](
        **{names.ENCODER_TOKEN_IDS: tf.constant(ids)}
    )
    np.testing.assert_array_equal(served[names.OUTPUT_TOKEN_IDS], expected)
    native = native_loader.run_signature(
        result.path, names.GENERATE_BEAM_SEARCH, {names.ENCODER_TOKEN_IDS: ids}
    )
    np.testing.assert_array_equal(native[names.OUTPUT_TOKEN_IDS], expected)
    # The option does something on these inputs (else the test is weak).
    assert not np.array_equal(expected, greedy)
    with pytest.raises(ValueError, match="num_beams"):
        ServingOptions(num_beams=0)
    with pytest.raises(ValueError, match="length_penalty"):
        ServingOptions(length_penalty="long")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
