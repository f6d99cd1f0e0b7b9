r"""Answers one TF Serving `PredictRequest` from an exported SavedModel the
way the server would: in its own process, with Keras and keras_moe blocked.

Usage (run as a script, so that the repository is not on `sys.path`):

    python apps/serving_probe.py /tmp/models/vit_moe/1 request.pb \
        response.pb

Reads the serialized `tensorflow_serving.apis.predict_pb2.PredictRequest`,
loads the SavedModel with `tf.saved_model.load`, calls the signature the
request names (`serving_default` when it names none) on its inputs and
writes the serialized `PredictResponse` (outputs as `TensorProto`s, the
model spec echoed). Exits with status 1 and one line on stderr when the
request cannot be answered.
"""

import sys

# Nothing of the training stack may be needed to serve: make it unimportable
# before TensorFlow is imported.
for _name in ("keras", "keras_moe", "export", "apps"):
    sys.modules[_name] = None

import tensorflow as tf  # noqa: E402
from tensorflow_serving.apis import predict_pb2  # noqa: E402


def answer(saved_model_dir, request):
    """The `PredictResponse` of `request` from the SavedModel."""
    loaded = tf.saved_model.load(saved_model_dir)
    name = request.model_spec.signature_name or "serving_default"
    if name not in loaded.signatures:
        raise ValueError(
            f"signature {name!r} not in {sorted(loaded.signatures)}"
        )
    inputs = {
        key: tf.constant(tf.make_ndarray(proto))
        for key, proto in request.inputs.items()
    }
    outputs = loaded.signatures[name](**inputs)
    response = predict_pb2.PredictResponse()
    response.model_spec.CopyFrom(request.model_spec)
    response.model_spec.signature_name = name
    for key, value in outputs.items():
        response.outputs[key].CopyFrom(tf.make_tensor_proto(value.numpy()))
    return response


def main(argv):
    if len(argv) != 4:
        sys.stderr.write(
            "usage: serving_probe.py SAVED_MODEL_DIR REQUEST RESPONSE\n"
        )
        return 2
    _, saved_model_dir, request_path, response_path = argv
    try:
        with open(request_path, "rb") as f:
            request = predict_pb2.PredictRequest.FromString(f.read())
        response = answer(saved_model_dir, request)
    except Exception as error:  # noqa: BLE001 - reported in one line
        message = " ".join(f"{type(error).__name__}: {error}".split())
        sys.stderr.write(f"error: {message}\n")
        return 1
    with open(response_path, "wb") as f:
        f.write(response.SerializeToString())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
