"""TF Serving layout, atomic export, the launcher, and refused inputs."""

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import app
from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

import keras_moe
from export import export_saved_model as launcher
from export import latency
from export import saved_model
from export import serving_config
from export import signature_names as names
from export.adapters import ServingOptions
from keras_moe.models.vit import ViT
from keras_moe.utils import files
from tests.export import export_test_utils as utils

OPTIONS = ServingOptions(top_k=2, xla_batch_size=2)


@pytest.fixture(scope="module")
def vit():
    keras.utils.set_random_seed(0)
    return utils.randomize(
        ViT.from_architecture("vit_tiny", num_layers=1), seed=0
    )


@pytest.fixture(scope="module")
def vit_file(vit, tmp_path_factory):
    path = tmp_path_factory.mktemp("keras") / "vit.keras"
    vit.save(path)
    return path


def _launcher_command(model, export_base, version, *flags):
    return [
        sys.executable,
        "-m",
        "export.export_saved_model",
        f"--model={model}",
        f"--export_base={export_base}",
        f"--version={version}",
        "--xla_batch_size=2",
        *flags,
    ]


def test_layout_and_serving_config(vit, tmp_path):
    base = tmp_path / "models"
    result = saved_model.export_saved_model(
        vit, base, "vit", version=5, options=OPTIONS
    )
    version_dir = pathlib.Path(result.path)
    assert version_dir == base.absolute() / "vit" / "5"
    assert (version_dir / "saved_model.pb").is_file()
    assert (version_dir / "variables" / "variables.index").is_file()
    extra = version_dir / "assets.extra"
    assert sorted(p.name for p in extra.iterdir()) == [
        saved_model.METADATA_FILE,
        saved_model.WARMUP_FILE,
    ]
    # Nothing but the version is left in the model directory.
    assert [p.name for p in version_dir.parent.iterdir()] == ["5"]
    saved_model.export_saved_model(
        vit, base, "other", version=2, options=OPTIONS, warmup=False
    )
    assert serving_config.served_models(base) == {"other": [2], "vit": [5]}
    path = serving_config.write_model_config(base, "/models")
    config = text_format.Parse(
        pathlib.Path(path).read_text(),
        model_server_config_pb2.ModelServerConfig(),
    )
    entries = {c.name: c for c in config.model_config_list.config}
    assert sorted(entries) == ["other", "vit"]
    assert entries["vit"].base_path == "/models/vit"
    assert entries["vit"].model_platform == "tensorflow"
    assert entries["vit"].model_version_policy.latest.num_versions == 1


def test_export_to_ram_filesystem_and_load_back(vit):
    # TensorFlow's in-memory file system stands in for gs:// and s3://:
    # every file goes through tf.io.gfile, none to a local "ram:" folder.
    base = "ram://keras_moe_test/models"
    result = saved_model.export_saved_model(
        vit, base, "vit", version=3, options=OPTIONS
    )
    assert result.path == base + "/vit/3"
    assert not os.path.exists("ram:")
    assert tf.io.gfile.exists(result.path + "/saved_model.pb")
    assert serving_config.served_models(base) == {"vit": [3]}
    config = serving_config.write_model_config(base)
    assert config == base + "/models.config"
    with tf.io.gfile.GFile(config) as f:
        parsed = text_format.Parse(
            f.read(), model_server_config_pb2.ModelServerConfig()
        )
    assert parsed.model_config_list.config[0].base_path == base + "/vit"
    batching = serving_config.write_batching_parameters(base)
    with tf.io.gfile.GFile(batching) as f:
        assert "allowed_batch_sizes: 2" in f.read()
    assert saved_model.read_metadata(result.path)["version"] == 3
    loaded = tf.saved_model.load(result.path)
    inputs = result.adapter.example_inputs(names.SERVING_DEFAULT, batch_size=2)
    served = loaded.signatures[names.SERVING_DEFAULT](**inputs)
    expected = result.adapter.signatures()[names.SERVING_DEFAULT](**inputs)
    np.testing.assert_allclose(
        served[names.PROBABILITIES], expected[names.PROBABILITIES], atol=1e-6
    )
    # Refused and replaced as on local disk.
    with pytest.raises(FileExistsError):
        saved_model.export_saved_model(
            vit, base, "vit", version=3, options=OPTIONS
        )
    saved_model.export_saved_model(
        vit, base, "vit", version=3, options=OPTIONS, overwrite=True
    )
    assert serving_config.served_models(base) == {"vit": [3]}
    files.remove_tree("ram://keras_moe_test")
    assert not tf.io.gfile.exists(base)


def test_export_is_readable_under_umask_022(vit, tmp_path):
    old = os.umask(0o022)
    try:
        result = saved_model.export_saved_model(
            vit, tmp_path / "models", "vit", version=1, options=OPTIONS
        )
        config = serving_config.write_model_config(tmp_path / "models")
    finally:
        os.umask(old)
    for root, dirs, entries in os.walk(tmp_path / "models"):
        for name in dirs:
            mode = os.stat(os.path.join(root, name)).st_mode & 0o777
            assert mode == 0o755, (root, name, oct(mode))
        for name in entries:
            mode = os.stat(os.path.join(root, name)).st_mode & 0o777
            assert mode == 0o644, (root, name, oct(mode))
    assert os.stat(config).st_mode & 0o777 == 0o644
    assert os.path.isdir(result.path)


def test_existing_version_is_refused_unless_overwrite(vit, tmp_path):
    base = tmp_path / "models"
    saved_model.export_saved_model(
        vit, base, "vit", version=1, options=OPTIONS, warmup=False
    )
    for error in (FileExistsError, ValueError):
        with pytest.raises(error, match="pass overwrite=True"):
            saved_model.export_saved_model(
                vit, base, "vit", version=1, options=OPTIONS
            )
    result = saved_model.export_saved_model(
        vit,
        base,
        "vit",
        version=1,
        options=ServingOptions(top_k=4, xla_batch_size=2),
        overwrite=True,
        warmup=False,
    )
    assert saved_model.read_metadata(result.path)["options"]["top_k"] == 4
    assert [p.name for p in (base / "vit").iterdir()] == ["1"]


def test_failed_export_leaves_no_version(vit, tmp_path, monkeypatch):
    base = tmp_path / "models"

    def fail(temp_dir):
        assert os.path.isfile(os.path.join(temp_dir, "saved_model.pb"))
        raise RuntimeError("disk full")

    monkeypatch.setattr(saved_model, "before_commit_hook", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        saved_model.export_saved_model(
            vit, base, "vit", version=1, options=OPTIONS, warmup=False
        )
    assert list((base / "vit").iterdir()) == []


def test_killed_export_leaves_no_version_and_rerun_succeeds(vit_file, tmp_path):
    base = tmp_path / "models"
    marker = tmp_path / "paused"
    argv = _launcher_command(vit_file, base, 7)[2:]
    # The launcher, paused between writing the SavedModel and the rename.
    code = textwrap.dedent(f"""
        import pathlib, time
        from absl import app
        from export import export_saved_model, saved_model

        def pause(temp_dir):
            pathlib.Path({str(marker)!r}).write_text(str(temp_dir))
            time.sleep(600)

        saved_model.before_commit_hook = pause
        app.run(export_saved_model.main, argv={argv!r})
        """)
    process = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=utils.ROOT,
        env=utils.subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert process.poll() is None, process.stderr.read().decode()[
                -3000:
            ]
            assert time.monotonic() < deadline, "the export never paused"
            time.sleep(0.2)
        temp_dir = pathlib.Path(marker.read_text())
        assert (temp_dir / "saved_model.pb").is_file()
        assert temp_dir.parent == base.absolute() / "vit"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    # What a server polling the base sees: no version at all.
    assert not (base / "vit" / "7").exists()
    assert serving_config.served_models(base) == {}
    assert temp_dir.exists()  # the hidden leftover
    rerun = subprocess.run(
        _launcher_command(vit_file, base, 7),
        cwd=utils.ROOT,
        env=utils.subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert (base / "vit" / "7" / "saved_model.pb").is_file()
    assert not temp_dir.exists()  # removed by the rerun
    assert serving_config.served_models(base) == {"vit": [7]}
    assert (base / serving_config.MODEL_CONFIG_FILE).is_file()
    batching = (base / serving_config.BATCHING_PARAMETERS_FILE).read_text()
    # serving_xla takes batches of exactly --xla_batch_size (2): every
    # merged batch is padded to it.
    assert "max_batch_size { value: 2 }" in batching
    assert "allowed_batch_sizes: 2" in batching
    # A second run of the same version is refused by the launcher.
    again = subprocess.run(
        _launcher_command(vit_file, base, 7),
        cwd=utils.ROOT,
        env=utils.subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert again.returncode != 0
    assert "exists" in again.stderr and "--overwrite" in again.stderr


def test_unknown_model_type_is_refused(tmp_path):
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    with pytest.raises(ValueError, match="No serving adapter for model class"):
        saved_model.export_saved_model(model, tmp_path, "mlp", version=1)
    path = tmp_path / "mlp.keras"
    model.save(path)
    loaded = saved_model.load_model(path)
    with pytest.raises(ValueError, match="registered: .*'ViT'"):
        saved_model.export_saved_model(loaded, tmp_path, "mlp", version=1)
    assert not (tmp_path / "mlp").exists()


@pytest.mark.parametrize(
    "path, error",
    [
        ("model.h5", ValueError),
        ("missing.keras", FileNotFoundError),
    ],
)
def test_load_model_refuses_bad_paths(tmp_path, path, error):
    with pytest.raises(error):
        saved_model.load_model(tmp_path / path)


def test_not_a_keras_file_is_refused(tmp_path):
    path = tmp_path / "broken.keras"
    path.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="Cannot load"):
        saved_model.load_model(path)


@pytest.mark.parametrize(
    "model_name, version",
    [
        ("", 1),
        (".hidden", 1),
        ("a/b", 1),
        ("vit", -1),
        ("vit", "1"),
        ("vit", True),
    ],
)
def test_bad_layout_parts_are_refused(vit, tmp_path, model_name, version):
    with pytest.raises(ValueError):
        saved_model.export_saved_model(
            vit, tmp_path, model_name, version=version, options=OPTIONS
        )


def test_headless_vit_is_refused(tmp_path):
    model = ViT.from_architecture("vit_tiny", num_layers=1, num_classes=0)
    with pytest.raises(ValueError, match="num_classes=0"):
        saved_model.export_saved_model(model, tmp_path, "vit", version=1)


def test_bad_capacity_factor_is_refused(tmp_path):
    model = keras_moe.upcycle(
        ViT.from_architecture("vit_tiny", num_layers=2), num_experts=2
    )
    with pytest.raises(ValueError):
        saved_model.export_saved_model(
            model, tmp_path, "vit", version=1, eval_capacity_factor=-2.0
        )
    assert not (tmp_path / "vit").exists()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("none", None),
        ("None", None),
        ("keep", saved_model.KEEP),
        ("1.5", 1.5),
        (" 2 ", 2.0),
    ],
)
def test_parse_capacity_factor(text, expected):
    assert launcher.parse_capacity_factor(text) == expected


@pytest.mark.parametrize("text", ["0", "-1", "auto", ""])
def test_parse_capacity_factor_refuses(text):
    with pytest.raises(app.UsageError):
        launcher.parse_capacity_factor(text)


def test_benchmark_reports_both_sides(vit, tmp_path):
    result = saved_model.export_saved_model(
        vit, tmp_path, "vit", version=1, options=OPTIONS, warmup=False
    )
    figures = latency.measure_latency(
        result.adapter, result.path, batch_size=4, repeats=2, warmup=1
    )
    assert figures["signature"] == "predict_images_float32"
    assert figures["inputs"] == {"images": [4, 32, 32, 3]}
    for side in ("keras", "keras_tf_function", "saved_model"):
        assert figures[side]["median_ms"] > 0
    assert np.isfinite(figures["saved_model_over_keras"])


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
