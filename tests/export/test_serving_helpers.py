"""Client requests, REST bodies, serving config files, export options."""

import base64
import json
import sys

import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.config import model_server_config_pb2

from export import client
from export import serving_config
from export import signature_names as names
from export.adapters import ServingOptions
from export.t5_serving import check_sentencepiece_model
from tests.export import export_test_utils as utils

# Ends with NUL bytes, which NumPy's "S" dtype would strip.
BINARY = b"\x89PNG\r\n\x1a\n\x00data\x00\x00"


def test_predict_request_round_trip():
    images = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    request = client.images_request(
        "vit", images, names.PREDICT_IMAGES_UINT8, version=3
    )
    parsed = predict_pb2.PredictRequest.FromString(request.SerializeToString())
    assert parsed.model_spec.name == "vit"
    assert parsed.model_spec.signature_name == names.PREDICT_IMAGES_UINT8
    assert parsed.model_spec.version.value == 3
    assert parsed.inputs[names.IMAGES].dtype == tf.uint8.as_datatype_enum
    received = client.request_inputs(parsed)
    np.testing.assert_array_equal(received[names.IMAGES], images)
    assert received[names.IMAGES].dtype == np.uint8


def test_string_requests_keep_bytes_exactly():
    request = client.image_bytes_request("vit", [BINARY, b"x"])
    received = client.request_inputs(request)[names.IMAGE_BYTES]
    assert list(received) == [BINARY, b"x"]
    text = client.request_inputs(client.text_request("t5", ["héllo", ""]))
    assert list(text[names.TEXT]) == ["héllo".encode("utf-8"), b""]


def test_token_ids_request_casts_to_int32():
    request = client.token_ids_request("t5", np.array([[5, 6, 1]], "int64"))
    ids = client.request_inputs(request)[names.ENCODER_TOKEN_IDS]
    assert ids.dtype == np.int32 and ids.tolist() == [[5, 6, 1]]


@pytest.mark.parametrize(
    "build",
    [
        lambda: client.images_request("m", np.zeros((4, 4, 3), np.uint8)),
        lambda: client.images_request("m", np.zeros((1, 4, 4, 3), np.int64)),
        lambda: client.token_ids_request("m", np.zeros((2,), np.int32)),
        lambda: client.token_ids_request("m", np.zeros((1, 2), np.float32)),
        lambda: client.text_request("m", "one string"),
        lambda: client.image_bytes_request("m", ["not bytes"]),
        lambda: client.predict_request("m", "serving_default", {}),
        lambda: client.rest_body({"x": [1]}, format="rows"),
        lambda: client.rest_body({"a": [1, 2], "b": [1]}),
    ],
)
def test_client_helpers_refuse_bad_inputs(build):
    with pytest.raises(ValueError):
        build()


def test_rest_bodies():
    ids = np.array([[5, 6, 1], [7, 1, 0]], np.int32)
    row = client.rest_body({names.ENCODER_TOKEN_IDS: ids})
    assert row == {
        "instances": [
            {"encoder_token_ids": [5, 6, 1]},
            {"encoder_token_ids": [7, 1, 0]},
        ]
    }
    columnar = client.rest_body(
        {names.IMAGE_BYTES: [BINARY]}, names.PREDICT_IMAGE_BYTES, "inputs"
    )
    assert columnar["signature_name"] == names.PREDICT_IMAGE_BYTES
    (encoded,) = columnar["inputs"][names.IMAGE_BYTES]
    assert base64.b64decode(encoded["b64"]) == BINARY
    text = client.rest_body({names.TEXT: ["héllo"]}, names.GENERATE_TEXT)
    assert json.loads(json.dumps(text)) == {
        "signature_name": "generate_text",
        "instances": [{"text": "héllo"}],
    }
    floats = client.rest_body({"x": np.float32([[0.1]])}, format="inputs")
    assert np.float32(floats["inputs"]["x"][0][0]) == np.float32(0.1)


# Request bodies in the form TF Serving's REST API documentation gives for
# :predict (tensorflow.org/tfx/serving/api_rest, "Specifying input tensors
# in row format" / "in column format" / "Encoding binary values"): three
# named inputs of a batch of two - a string, a vector and a matrix per
# example - and a binary input sent as {"b64": <standard base64>}. Written
# out by hand from that format, not produced by export.client.
DOCUMENTED_ROW_BODY = """
{
  "instances": [
    {"tag": "foo", "signal": [1, 2, 3, 4, 5], "sensor": [[1, 2], [3, 4]]},
    {"tag": "bar", "signal": [3, 4, 1, 2, 5], "sensor": [[4, 5], [6, 8]]}
  ]
}
"""
DOCUMENTED_COLUMNAR_BODY = """
{
  "inputs": {
    "tag": ["foo", "bar"],
    "signal": [[1, 2, 3, 4, 5], [3, 4, 1, 2, 5]],
    "sensor": [[[1, 2], [3, 4]], [[4, 5], [6, 8]]]
  }
}
"""
DOCUMENTED_BINARY_BODY = """
{
  "signature_name": "classify_objects",
  "instances": [
    {"image": {"b64": "aW1hZ2UgYnl0ZXM="}, "caption": "seaside"},
    {"image": {"b64": "YXdlc29tZSBpbWFnZSBieXRlcw=="}, "caption": "mountains"}
  ]
}
"""
DOCUMENTED_TENSORS = {
    "tag": ["foo", "bar"],
    "signal": np.array([[1, 2, 3, 4, 5], [3, 4, 1, 2, 5]], np.int32),
    "sensor": np.array([[[1, 2], [3, 4]], [[4, 5], [6, 8]]], np.int32),
}


@pytest.mark.parametrize(
    "golden, format",
    [
        (DOCUMENTED_ROW_BODY, client.ROW_FORMAT),
        (DOCUMENTED_COLUMNAR_BODY, client.COLUMNAR_FORMAT),
    ],
)
def test_rest_bodies_match_the_documented_format(golden, format):
    body = client.rest_body(DOCUMENTED_TENSORS, format=format)
    assert body == json.loads(golden)


def test_rest_bytes_match_the_documented_b64_form():
    images = [b"image bytes", b"awesome image bytes"]
    body = client.rest_body(
        {"image": images, "caption": ["seaside", "mountains"]},
        "classify_objects",
    )
    assert body == json.loads(DOCUMENTED_BINARY_BODY)


def test_warmup_requests_round_trip(tmp_path):
    requests = [
        client.text_request("t5", ["a", "b"]),
        client.token_ids_request("t5", [[3, 1]]),
    ]
    client.write_warmup_requests(tmp_path / "warmup", requests)
    assert client.read_warmup_requests(tmp_path / "warmup") == requests


def test_model_config_text_parses():
    text = serving_config.model_config_text(
        {"vit": "/models/vit", "t5": "/models/t5"}, num_versions=2
    )
    config = text_format.Parse(
        text, model_server_config_pb2.ModelServerConfig()
    )
    entries = [(c.name, c.base_path) for c in config.model_config_list.config]
    assert entries == [("t5", "/models/t5"), ("vit", "/models/vit")]
    assert (
        config.model_config_list.config[
            0
        ].model_version_policy.latest.num_versions
        == 2
    )


def test_model_config_needs_models(tmp_path):
    with pytest.raises(ValueError):
        serving_config.model_config_text({})
    with pytest.raises(ValueError, match="No exported model"):
        serving_config.write_model_config(tmp_path)


def test_batching_parameters_text():
    text = serving_config.batching_parameters_text(
        max_batch_size=8,
        batch_timeout_micros=500,
        num_batch_threads=2,
        allowed_batch_sizes=(4, 8),
    )
    assert text.splitlines() == [
        "max_batch_size { value: 8 }",
        "batch_timeout_micros { value: 500 }",
        "max_enqueued_batches { value: 100 }",
        "num_batch_threads { value: 2 }",
        "allowed_batch_sizes: 4",
        "allowed_batch_sizes: 8",
        "pad_variable_length_inputs: false",
    ]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_batch_size": -1},
        {"max_batch_size": 8, "allowed_batch_sizes": (4, 6)},
        {"max_batch_size": 8, "allowed_batch_sizes": (8, 4, 8)},
        {"num_batch_threads": 1.5},
    ],
)
def test_batching_parameters_refuses(kwargs):
    with pytest.raises(ValueError):
        serving_config.batching_parameters_text(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"top_k": 0},
        {"image_dtype": "float16"},
        {"image_std": (0.0,)},
        {"image_mean": ()},
        {"max_length": 0},
        {"max_input_length": 1},
        {"xla_batch_size": True},
        {"sentencepiece_model": "spm.model"},
    ],
)
def test_serving_options_refuse(kwargs):
    with pytest.raises(ValueError):
        ServingOptions(**kwargs)


def test_sentencepiece_model_checks():
    model = utils.train_sentencepiece(vocab_size=100)
    assert check_sentencepiece_model(model, 128) == 100
    with pytest.raises(ValueError, match="larger than"):
        check_sentencepiece_model(model, 64)
    with pytest.raises(ValueError, match="pad_id=0"):
        check_sentencepiece_model(
            utils.train_sentencepiece(
                vocab_size=100, pad_id=-1, unk_id=0, eos_id=1
            ),
            128,
        )
    with pytest.raises(ValueError, match="Not a SentencePiece model"):
        check_sentencepiece_model(b"garbage", 128)


def test_batching_parameters_follow_the_xla_batch():
    text = serving_config.batching_parameters_text(
        xla_batch_size=4, num_batch_threads=2
    )
    assert "max_batch_size { value: 4 }" in text
    assert text.count("allowed_batch_sizes") == 1
    assert "allowed_batch_sizes: 4" in text
    for kwargs in (
        {"max_batch_size": 8},
        {"max_batch_size": 8, "allowed_batch_sizes": (4, 8)},
        {"allowed_batch_sizes": (2, 4)},
    ):
        with pytest.raises(ValueError, match="serving_xla takes batches of"):
            serving_config.batching_parameters_text(xla_batch_size=4, **kwargs)


def test_batching_parameters_parse_as_the_documented_schema():
    # Independent of the writer: the field numbers and types of
    # session_bundle_config.proto's BatchingParameters, read off the wire.
    message = serving_config.batching_parameters(
        xla_batch_size=4, num_batch_threads=3, batch_timeout_micros=250
    )
    wire = message.SerializeToString()
    # Field 1 (max_batch_size), an Int64Value {1: 4}: tag 0x0a, length 2.
    assert wire.startswith(b"\x0a\x02\x08\x04")
    assert b"\x12\x03\x08\xfa\x01" in wire  # 2: batch_timeout_micros 250
    assert b"\x22\x02\x08\x03" in wire  # 4: num_batch_threads 3
    assert b"\x32\x01\x04" in wire  # 6: allowed_batch_sizes [4], packed


def test_exports_disagreeing_on_the_xla_batch_are_refused(tmp_path):
    for name, size in (("a", 2), ("b", 4)):
        version = tmp_path / name / "1"
        (version / "assets.extra").mkdir(parents=True)
        (version / "saved_model.pb").write_bytes(b"")
        (version / serving_config.METADATA_FILE).write_text(
            json.dumps(
                {
                    "signatures": {"serving_xla": {}},
                    "options": {"xla_batch_size": size},
                }
            )
        )
    with pytest.raises(ValueError, match="different batch sizes"):
        serving_config.write_batching_parameters(tmp_path)
    assert not (tmp_path / serving_config.BATCHING_PARAMETERS_FILE).exists()
    path = serving_config.write_batching_parameters(
        tmp_path, xla_batch_size=None, max_batch_size=16
    )
    assert "max_batch_size { value: 16 }" in open(path).read()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
