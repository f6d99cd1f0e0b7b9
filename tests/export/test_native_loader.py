"""export.native_loader: the C API loader, its tensor files and its errors.

A small SavedModel of plain TensorFlow (no Keras) with float, int and string
inputs is run through the C program; its outputs are compared with the same
`tf.function` run in this process. The exported keras_moe models are run
through it in test_export.py, test_export_e3.py and test_export_vlm.py.
"""

import os
import sys

import numpy as np
import pytest
import tensorflow as tf

from export import native_loader


class _Echo(tf.Module):
    @tf.function(
        input_signature=[
            tf.TensorSpec([None, 3], tf.float32, name="x"),
            tf.TensorSpec([None], tf.int64, name="n"),
            tf.TensorSpec([None], tf.string, name="s"),
        ]
    )
    def serve(self, x, n, s):
        return {
            "y": tf.reduce_sum(x * 2.0, axis=1) + tf.cast(n, tf.float32),
            "s": tf.strings.join([s, tf.strings.as_string(n)], "-"),
            "u": tf.cast(tf.abs(x) * 10, tf.uint8),
        }


@pytest.fixture(scope="module")
def echo_model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("echo") / "1")
    module = _Echo()
    tf.saved_model.save(module, path, signatures={"echo": module.serve})
    return path, module


def test_runs_a_signature_like_tensorflow(echo_model):
    path, module = echo_model
    x = np.array([[1.5, -2.0, 0.25], [3.0, 4.0, -5.0]], np.float32)
    n = np.array([7, -1], np.int64)
    s = np.array([b"a\x00b", "\u00e9t\u00e9".encode()], dtype=object)
    outputs = native_loader.run_signature(
        path, "echo", {"x": x, "n": n, "s": s}
    )
    expected = module.serve(x, n, tf.constant(list(s)))
    np.testing.assert_array_equal(outputs["y"], expected["y"].numpy())
    assert list(outputs["s"]) == list(expected["s"].numpy())
    assert outputs["u"].dtype == np.uint8
    np.testing.assert_array_equal(outputs["u"], expected["u"].numpy())


def test_signature_tensors_come_from_the_signature_defs(echo_model):
    path, _ = echo_model
    inputs, outputs = native_loader.signature_tensors(path, "echo")
    assert sorted(inputs) == ["n", "s", "x"]
    assert inputs["x"].shape == (-1, 3) and inputs["s"].dtype == 7
    assert sorted(outputs) == ["s", "u", "y"]
    assert all(":" in info.name for info in outputs.values())


def test_tensor_files_round_trip(tmp_path):
    for value, enum in (
        (np.arange(6, dtype=np.float32).reshape(2, 3), 1),
        (np.array([[1, -2]], np.int32), 3),
        (np.zeros((0, 4), np.uint8), 4),
        (np.array(True), 10),
    ):
        path = tmp_path / f"t{enum}"
        native_loader.write_tensor(path, value, enum)
        back = native_loader.read_tensor(path)
        assert back.dtype == value.dtype and back.shape == value.shape
        np.testing.assert_array_equal(back, value)


def test_bad_requests_are_refused(echo_model):
    path, _ = echo_model
    with pytest.raises(ValueError, match="no signature 'nope'.*'echo'"):
        native_loader.run_signature(path, "nope", {})
    with pytest.raises(ValueError, match=r"takes \['n', 's', 'x'\]"):
        native_loader.run_signature(path, "echo", {"x": np.zeros((1, 3))})
    with pytest.raises(ValueError, match="no MetaGraph tagged 'train'"):
        native_loader.signature_tensors(path, "echo", tag="train")


def test_a_failing_graph_reports_the_loaders_message(echo_model):
    path, _ = echo_model
    with pytest.raises(native_loader.NativeLoaderError, match="TF_SessionRun"):
        native_loader.run_signature(
            path,
            "echo",
            {
                "x": np.zeros((2, 3), np.float32),
                "n": np.zeros(3, np.int64),  # batch sizes disagree
                "s": np.array([b"a", b"b"], dtype=object),
            },
        )


def test_a_missing_compiler_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "no-such-compiler-here")
    with pytest.raises(native_loader.NativeLoaderError, match="install gcc"):
        native_loader.build_runner(cache_dir=str(tmp_path))
    assert not os.listdir(tmp_path)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
