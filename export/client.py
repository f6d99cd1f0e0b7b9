"""Client helpers: TF Serving requests for the exported signatures.

gRPC: `predict_request` builds a `tensorflow_serving.apis.predict_pb2.
PredictRequest` for any signature; `images_request`, `image_bytes_request`,
`token_ids_request` and `text_request` name the inputs of the keras_moe
signatures (`export.signature_names`) for you. Send it with
`prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request)`.

REST: `rest_body` builds the JSON body of
`POST /v1/models/<name>[/versions/<v>]:predict`, in the row format
(`{"instances": [...]}`, one object per example) or the columnar format
(`{"inputs": {...}}`). Byte strings (encoded images) are sent as
`{"b64": ...}`, as TF Serving requires for binary data; `str` values are
sent as JSON strings.

This module needs TensorFlow, NumPy and `tensorflow-serving-api`; it
imports neither Keras nor keras_moe.

Example:

    request = images_request("vit", images_uint8)        # gRPC
    body = rest_body({"images": images_uint8.tolist()})  # REST
"""

import base64

import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_log_pb2

from . import signature_names as names

ROW_FORMAT = "instances"
COLUMNAR_FORMAT = "inputs"


def _to_array(value):
    """NumPy array of `value`; strings as an object array of str / bytes.

    Lists of bytes do not go through NumPy's "S" dtype, which would strip
    trailing NUL bytes (an encoded image may end with some).
    """
    if isinstance(value, np.ndarray):
        array = value
    else:
        array = np.asarray(value)
        if array.dtype.kind in ("U", "S"):
            array = np.array(value, dtype=object)
    if array.dtype.kind in ("U", "S"):
        array = np.array(array.reshape(-1).tolist(), dtype=object).reshape(
            array.shape
        )
    return array


def _as_array(value, name):
    """`_to_array`, with str encoded to UTF-8 bytes (as tensors hold)."""
    array = _to_array(value)
    if array.dtype.kind == "O":
        flat = [
            item.encode("utf-8") if isinstance(item, str) else item
            for item in array.reshape(-1).tolist()
        ]
        if not all(isinstance(item, bytes) for item in flat):
            raise ValueError(
                f"Input {name!r}: string inputs must be str or bytes"
            )
        array = np.array(flat, dtype=object).reshape(array.shape)
    return array


def predict_request(model_name, signature_name, inputs, version=None):
    """A `PredictRequest` for one signature.

    Args:
        model_name: the served model's name.
        signature_name: e.g. "serving_default".
        inputs: {input name: array-like}; dtypes are kept as given (cast to
            the signature's dtype first: TF Serving does not convert).
        version: None for the latest version, or an int.

    Returns:
        A `predict_pb2.PredictRequest`.
    """
    if not inputs:
        raise ValueError("inputs must name at least one tensor")
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature_name
    if version is not None:
        request.model_spec.version.value = int(version)
    for name, value in inputs.items():
        request.inputs[name].CopyFrom(
            tf.make_tensor_proto(_as_array(value, name))
        )
    return request


def request_inputs(request):
    """{input name: NumPy array} of a `PredictRequest`, as a server sees it."""
    return {
        name: tf.make_ndarray(proto) for name, proto in request.inputs.items()
    }


def images_request(
    model_name, images, signature_name=names.SERVING_DEFAULT, version=None
):
    """Request for an image signature: images <uint8 or float32>[B, H, W, C].

    The array's dtype must be the signature's: uint8 for
    `predict_images_uint8`, float32 for `predict_images_float32`, and the
    export's `image_dtype` for `serving_default`.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype not in (np.uint8, np.float32):
        raise ValueError(
            "images must be uint8 or float32 of rank 4 [B, H, W, C]; "
            f"received {images.dtype} {images.shape}"
        )
    return predict_request(
        model_name, signature_name, {names.IMAGES: images}, version
    )


def image_bytes_request(model_name, encoded_images, version=None):
    """Request for `predict_image_bytes`: a list of JPEG or PNG bytes."""
    return predict_request(
        model_name,
        names.PREDICT_IMAGE_BYTES,
        {names.IMAGE_BYTES: _byte_list(encoded_images)},
        version,
    )


def token_ids_request(
    model_name, token_ids, signature_name=names.SERVING_DEFAULT, version=None
):
    """Request for T5 `serving_default` / `serving_xla`: ids <int>[B, T].

    Sequences must already be padded to one length with 0.
    """
    token_ids = np.asarray(token_ids)
    if token_ids.ndim != 2 or token_ids.dtype.kind not in "iu":
        raise ValueError(
            "token_ids must be integers of rank 2 [B, T] (0-padded); "
            f"received {token_ids.dtype} {token_ids.shape}"
        )
    return predict_request(
        model_name,
        signature_name,
        {names.ENCODER_TOKEN_IDS: token_ids.astype(np.int32)},
        version,
    )


def text_request(model_name, texts, version=None):
    """Request for T5 `generate_text`: a list of strings."""
    if isinstance(texts, (str, bytes)):
        raise ValueError("texts must be a list of strings, not one string")
    return predict_request(
        model_name,
        names.GENERATE_TEXT,
        {names.TEXT: np.array(list(texts), dtype=object)},
        version,
    )


def _byte_list(values):
    values = list(values)
    if not all(isinstance(v, bytes) for v in values):
        raise ValueError("Encoded images must be a list of bytes objects")
    return np.array(values, dtype=object)


def _json_value(value):
    """A NumPy value (array or scalar) -> JSON-friendly nested lists."""
    if isinstance(value, np.ndarray):
        return [_json_value(item) for item in value]
    if isinstance(value, bytes):
        return {"b64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, np.generic):
        return value.item()
    return value


def rest_body(inputs, signature_name=None, format=ROW_FORMAT):
    """The JSON body (a dict) of a REST predict call.

    Args:
        inputs: {input name: array-like}; every input shares the batch
            dimension in the row format.
        signature_name: None for `serving_default`.
        format: `"instances"` (row: a list of `{name: value}` objects, one
            per example) or `"inputs"` (columnar: `{name: batch}`).

    Returns:
        A dict; `json.dumps` it as the request body.

    Example:

    >>> rest_body({"text": ["hello"]}, "generate_text")
    {'signature_name': 'generate_text', 'instances': [{'text': 'hello'}]}
    """
    if format not in (ROW_FORMAT, COLUMNAR_FORMAT):
        raise ValueError(
            f"format must be {ROW_FORMAT!r} or {COLUMNAR_FORMAT!r}; "
            f"received {format!r}"
        )
    if not inputs:
        raise ValueError("inputs must name at least one tensor")
    # str stays text; bytes become {"b64": ...}.
    arrays = {name: _to_array(value) for name, value in inputs.items()}
    body = {}
    if signature_name is not None:
        body["signature_name"] = signature_name
    if format == COLUMNAR_FORMAT:
        body[COLUMNAR_FORMAT] = {
            name: _json_value(array) for name, array in arrays.items()
        }
        return body
    sizes = {name: array.shape[0] for name, array in arrays.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(
            f"The row format needs one batch size for all inputs; {sizes}"
        )
    (size,) = set(sizes.values())
    body[ROW_FORMAT] = [
        {name: _json_value(array[i]) for name, array in arrays.items()}
        for i in range(size)
    ]
    return body


def write_warmup_requests(path, requests):
    """Writes `PredictRequest`s as TF Serving warmup records.

    TF Serving replays `assets.extra/tf_serving_warmup_requests` (a TFRecord
    file of `PredictionLog`s) when it loads a version.
    """
    with tf.io.TFRecordWriter(str(path)) as writer:
        for request in requests:
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)
            )
            writer.write(log.SerializeToString())


def read_warmup_requests(path):
    """The `PredictRequest`s of a warmup file."""
    requests = []
    for record in tf.data.TFRecordDataset(str(path)):
        log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
        requests.append(log.predict_log.request)
    return requests
