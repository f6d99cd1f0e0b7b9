"""Calls an exported SavedModel the way TF Serving does: no Keras, no keras_moe.

Run as a script in a fresh process (`python serving_harness.py IN OUT`):
`keras`, `keras_moe` and `export` are made unimportable before TensorFlow
is imported, then the SavedModel is loaded with `tf.saved_model.load` and
its signatures are called. IN and OUT are pickle files (`run_harness` in
`tests/export/export_test_utils.py` writes IN and reads OUT):

    IN:  saved_model      the version directory
         tensorflow_text  load the tf-text op libraries (text signatures)
         calls            [{"id", "signature", "inputs": {name: array}}]
         requests         [{"id", "request": serialized PredictRequest}]
         warmup           replay assets.extra/tf_serving_warmup_requests
         concurrency      None or {"signature", "inputs": [input dicts],
                          "threads", "requests_per_thread"}
    OUT: outputs          {id: {output name: array}}
         errors           {id: "ExceptionType: message"}
         concurrency      {"calls", "mismatches", "exceptions"}
         blocked          {module: whether importing it failed}
"""

import sys

for _name in ("keras", "keras_moe", "export"):
    sys.modules[_name] = None

import concurrent.futures  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import os  # noqa: E402
import pickle  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def load_text_ops():
    """Loads the TensorFlow Text kernels, as a server linked with them has.

    `import tensorflow_text` would import Keras (its Keras layers), so the
    op libraries are loaded from the installed package's directory without
    importing it.
    """
    spec = importlib.util.find_spec("tensorflow_text")
    ops_dir = os.path.join(spec.submodule_search_locations[0], "python", "ops")
    for name in sorted(os.listdir(ops_dir)):
        if name.startswith("_") and name.endswith(".so"):
            tf.load_op_library(os.path.join(ops_dir, name))


def _numpy(outputs):
    return {name: value.numpy() for name, value in outputs.items()}


def _call(loaded, signature, inputs):
    function = loaded.signatures[signature]
    return _numpy(function(**{k: tf.constant(v) for k, v in inputs.items()}))


def _request_inputs(serialized):
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest.FromString(serialized)
    inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
    return request.model_spec.signature_name or "serving_default", inputs


def _concurrency(loaded, spec):
    function = loaded.signatures[spec["signature"]]
    inputs = [
        {k: tf.constant(v) for k, v in example.items()}
        for example in spec["inputs"]
    ]
    expected = [_numpy(function(**example)) for example in inputs]
    per_thread = spec["requests_per_thread"]

    def worker(thread):
        mismatches = 0
        for i in range(per_thread):
            index = (thread * per_thread + i) % len(inputs)
            outputs = _numpy(function(**inputs[index]))
            if outputs.keys() != expected[index].keys() or not all(
                np.array_equal(outputs[k], expected[index][k]) for k in outputs
            ):
                mismatches += 1
        return mismatches

    with concurrent.futures.ThreadPoolExecutor(spec["threads"]) as pool:
        futures = [pool.submit(worker, t) for t in range(spec["threads"])]
        mismatches, exceptions = 0, 0
        for future in futures:
            try:
                mismatches += future.result()
            except Exception:  # noqa: BLE001 - counted and reported
                exceptions += 1
    return {
        "calls": spec["threads"] * per_thread,
        "mismatches": mismatches,
        "exceptions": exceptions,
    }


def main(in_path, out_path):
    with open(in_path, "rb") as f:
        job = pickle.load(f)
    blocked = {}
    for name in ("keras", "keras_moe", "export"):
        try:
            importlib.import_module(name)
            blocked[name] = False
        except ImportError:
            blocked[name] = True
    if job.get("tensorflow_text"):
        load_text_ops()

    loaded = tf.saved_model.load(job["saved_model"])
    result = {"outputs": {}, "errors": {}, "blocked": blocked}
    calls = list(job.get("calls", []))
    for item in job.get("requests", []):
        signature, inputs = _request_inputs(item["request"])
        calls.append(
            {"id": item["id"], "signature": signature, "inputs": inputs}
        )
    if job.get("warmup"):
        from tensorflow_serving.apis import prediction_log_pb2

        path = os.path.join(
            job["saved_model"], "assets.extra", "tf_serving_warmup_requests"
        )
        for i, record in enumerate(tf.data.TFRecordDataset(path)):
            log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
            serialized = log.predict_log.request.SerializeToString()
            signature, inputs = _request_inputs(serialized)
            calls.append(
                {"id": f"warmup_{i}", "signature": signature, "inputs": inputs}
            )
    for call in calls:
        try:
            result["outputs"][call["id"]] = _call(
                loaded, call["signature"], call["inputs"]
            )
        except Exception as e:  # noqa: BLE001 - bad inputs are expected
            result["errors"][call["id"]] = f"{type(e).__name__}: {e}"
    if job.get("concurrency"):
        result["concurrency"] = _concurrency(loaded, job["concurrency"])
    with open(out_path, "wb") as f:
        pickle.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
