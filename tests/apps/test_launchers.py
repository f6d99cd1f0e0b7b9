"""Smoke tests of the launchers, chained as a user would run them.

train_dense (ViT, Hugging Face checkpoint) -> upcycle (.keras) -> train
(MirroredStrategy over 2 CPU devices, on a TFDS dataset prepared locally
under another name, run twice to check it resumes) -> evaluate (no-drop
capacity), each `python -m apps.<name>` in a subprocess with tiny settings.
Their outputs are checked against in-process computations: the checkpoint
read back, the experts as copies of the dense MLP, the metrics recomputed
with NumPy from the model's logits. The T5 path (original T5 checkpoint,
number_words) runs train_dense, upcycle and evaluate.
"""

import json
import os
import shutil
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_moe.checkpoints import read_checkpoint
from keras_moe.data import registry
from keras_moe.layers.moe import MoeLayer
from keras_moe.models.t5 import T5
from keras_moe.models.vit import ViT
from keras_moe.training.resumable import list_checkpoints
from tests.apps.app_runner import check_ok
from tests.apps.app_runner import run_app

TINY_VIT = [
    "--model_dim=16",
    "--num_heads=2",
    "--hidden_dim=32",
    "--num_layers=2",
    "--patch_size=4",
]


def _json_line(process):
    return json.loads(process.stdout.strip().splitlines()[-1])


def _softmax(logits):
    logits = np.asarray(logits, np.float64)
    exp = np.exp(logits - logits.max(-1, keepdims=True))
    return exp / exp.sum(-1, keepdims=True)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A data directory with `digits`, and a copy of it named `my_digits`
    standing in for a TFDS dataset a user prepared."""
    path = tmp_path_factory.mktemp("tfds")
    builder = registry.prepare("digits", str(path))
    shutil.copytree(
        os.path.dirname(builder.data_dir), path / "my_digits", symlinks=True
    )
    return path


@pytest.fixture(scope="module")
def digits_test(data_dir):
    """(images <float32>[360, 8, 8, 1] = uint8 / 255, labels <int>[360])."""
    examples = list(registry.load("digits", "test", str(data_dir)))
    images = np.stack([e["image"].numpy() for e in examples]) / 255.0
    labels = np.array([e["label"].numpy() for e in examples])
    return images.astype("float32"), labels


@pytest.fixture(scope="module")
def pretrained_vit(data_dir, tmp_path_factory):
    """(checkpoint dir, printed results) of `train_dense` on digits."""
    dense_dir = tmp_path_factory.mktemp("vit") / "dense"
    pretrained = _json_line(
        check_ok(
            run_app(
                "train_dense",
                "--architecture=vit",
                "--dataset=digits",
                "--epochs=1",
                "--steps_per_epoch=3",
                "--batch_size=16",
                *TINY_VIT,
                f"--output_dir={dense_dir}",
                data_dir=data_dir,
            )
        )
    )
    return dense_dir, pretrained


def test_train_dense_writes_a_hugging_face_checkpoint(
    pretrained_vit, digits_test
):
    images, labels = digits_test
    dense_dir, pretrained = pretrained_vit
    assert sorted(os.listdir(dense_dir)) == ["config.json", "model.safetensors"]
    dense = read_checkpoint(str(dense_dir))
    assert isinstance(dense, ViT) and dense.num_classes == 10
    probs = _softmax(dense(images))
    # The launcher scored the model before writing it; the checkpoint read
    # back scores the same.
    assert pretrained["test"]["examples"] == len(labels)
    np.testing.assert_allclose(
        pretrained["test"]["accuracy"],
        np.mean(probs.argmax(-1) == labels),
        atol=1e-6,
    )
    np.testing.assert_allclose(
        pretrained["test"]["nll"],
        -np.mean(np.log(probs[np.arange(len(labels)), labels])),
        rtol=1e-4,
    )


@pytest.fixture(scope="module")
def upcycled_vit(pretrained_vit, data_dir):
    """(moe .keras file, dense model) of `upcycle` on the checkpoint."""
    dense_dir, _ = pretrained_vit
    moe_file = dense_dir.parent / "moe.keras"
    process = check_ok(
        run_app(
            "upcycle",
            f"--checkpoint={dense_dir}",
            f"--output={moe_file}",
            "--num_experts=4",
            "--router=tokens_choose",
            "--num_selected_experts=1",
            "--normalize_combine_weights=true",
            "--eval_capacity_factor=none",
            data_dir=data_dir,
        )
    )
    assert "upcycled" in process.stdout
    return moe_file, read_checkpoint(str(dense_dir))


def test_upcycle_copies_the_mlp_into_every_expert(upcycled_vit, digits_test):
    images, _ = digits_test
    moe_file, dense = upcycled_vit
    moe = keras.saving.load_model(moe_file, compile=False)
    layer = moe.blocks[1].mlp
    assert isinstance(layer, MoeLayer) and layer.num_experts == 4
    assert not isinstance(moe.blocks[0].mlp, MoeLayer)
    dense_weights = dense.canonical_variables()
    moe_weights = moe.canonical_variables()
    for name in ("wi", "bi", "wo", "bo"):
        experts = moe_weights[f"encoder/block_1/mlp/experts/{name}"].numpy()
        assert experts.shape[0] == 4
        for expert in experts:
            np.testing.assert_array_equal(
                expert, dense_weights[f"encoder/block_1/mlp/{name}"].numpy()
            )
    # Top-1, renormalised, no drops: the MoE computes the dense function.
    np.testing.assert_allclose(moe(images), dense(images), atol=1e-5)


def test_train_mirrored_resumes_then_evaluate(
    upcycled_vit, data_dir, digits_test, tmp_path
):
    images, labels = digits_test
    moe_file, _ = upcycled_vit
    moe = keras.saving.load_model(moe_file, compile=False)
    # Continued training under MirroredStrategy on 2 CPU devices, on a
    # dataset prepared locally under another name; then the same command
    # again, which resumes from the last checkpoint and trains nothing.
    train_dir = tmp_path / "train"
    train_args = [
        f"--model={moe_file}",
        "--dataset=my_digits",
        f"--output_dir={train_dir}",
        "--strategy=mirrored",
        "--cpu_devices=2",
        "--batch_size=8",
        "--epochs=2",
        "--steps_per_epoch=2",
        "--save_every_steps=3",
        "--learning_rate=1e-3",
    ]
    first = _json_line(
        check_ok(run_app("train", *train_args, data_dir=data_dir))
    )
    assert first["strategy"] == "MirroredStrategy" and first["replicas"] == 2
    assert first["resumed_from_step"] == 0 and first["steps"] == 4
    assert [step for step, _ in list_checkpoints(train_dir / "backup")] == [
        3,
        4,
    ]
    history = json.loads((train_dir / "history.json").read_text())
    assert len(history["loss"]) == 2 and np.isfinite(history["loss"]).all()
    trained = keras.saving.load_model(train_dir / "model.keras", compile=False)
    name = "encoder/block_1/mlp/experts/wi"
    assert not np.allclose(
        trained.canonical_variables()[name].numpy(),
        moe.canonical_variables()[name].numpy(),
    )
    _check_tensorboard_logs(train_dir / "logs")

    second = _json_line(
        check_ok(run_app("train", *train_args, data_dir=data_dir))
    )
    assert second["resumed_from_step"] == 4
    again = keras.saving.load_model(train_dir / "model.keras", compile=False)
    for a, b in zip(trained.weights, again.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())

    # Evaluation with no-drop capacity, checked against NumPy.
    results = _json_line(
        check_ok(
            run_app(
                "evaluate",
                f"--model={train_dir / 'model.keras'}",
                "--dataset=digits",
                "--eval_capacity_factor=none",
                f"--output={tmp_path / 'eval' / 'metrics.json'}",
                data_dir=data_dir,
            )
        )
    )
    assert results["eval_capacity_factors"] == ["None"]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == (
        results
    )
    probs = _softmax(trained(images))
    assert results["examples"] == len(labels)
    np.testing.assert_allclose(
        results["accuracy"], np.mean(probs.argmax(-1) == labels), atol=1e-6
    )
    np.testing.assert_allclose(
        results["nll"],
        -np.mean(np.log(probs[np.arange(len(labels)), labels])),
        rtol=1e-4,
    )
    assert 0 <= results["ece"] <= 1 and 0 <= results["brier"] <= 2


def test_train_expert_parallel_on_a_mesh(upcycled_vit, data_dir, tmp_path):
    moe_file, _ = upcycled_vit
    moe = keras.saving.load_model(moe_file, compile=False)
    train_dir = tmp_path / "train_mesh"
    args = [
        f"--model={moe_file}",
        "--dataset=digits",
        f"--output_dir={train_dir}",
        "--mesh=batch:1,expert:2",
        "--cpu_devices=2",
        "--batch_size=8",
        "--epochs=2",
        "--steps_per_epoch=2",
        "--save_every_steps=3",
        "--learning_rate=1e-3",
    ]
    process = check_ok(run_app("train", *args, data_dir=data_dir))
    result = _json_line(process)
    assert result["mesh"] == {"batch": 1, "expert": 2}
    assert result["resumed_from_step"] == 0 and result["steps"] == 4
    # Keras' progress output (one line per epoch when not on a terminal).
    assert "Epoch 2/2" in process.stdout, process.stdout
    progress = [
        line for line in process.stdout.splitlines() if line.startswith("2/2")
    ]
    assert len(progress) == 2, process.stdout
    assert all("block_1_moe_max_load:" in line for line in progress)
    # History per epoch, as the strategy path writes it, routing included.
    history = json.loads((train_dir / "history.json").read_text())
    routing = [f"block_1_moe_{s}" for s in ("confidence", "dropped")]
    routing.append("block_1_moe_max_load")
    assert sorted(history) == sorted(["loss", *routing])
    assert all(len(v) == 2 and np.isfinite(v).all() for v in history.values())
    assert result["last_epoch"] == {k: v[-1] for k, v in history.items()}
    # Top-1 of 4 experts: at most 1 - 1/4 of the tokens of a group can be
    # dropped, the top probability is at least 1/4, the load in [1, 4].
    assert all(0 <= d <= 0.75 for d in history["block_1_moe_dropped"])
    assert all(0.25 <= c <= 1 for c in history["block_1_moe_confidence"])
    assert all(1 <= m <= 4 for m in history["block_1_moe_max_load"])
    # The trainer's checkpoint directory (ExpertParallelTrainer.save).
    assert os.listdir(train_dir / "backup") == ["expert_parallel"]
    meta = json.loads(
        (train_dir / "backup/expert_parallel/meta.json").read_text()
    )
    assert meta["step"] == 4
    _check_tensorboard_logs(train_dir / "logs")
    scalars = _epoch_scalars(train_dir / "logs" / "train")
    for key, values in history.items():
        np.testing.assert_allclose(scalars[f"epoch_{key}"], values, rtol=1e-6)
    trained = keras.saving.load_model(train_dir / "model.keras", compile=False)
    name = "encoder/block_1/mlp/experts/wi"
    assert not np.allclose(
        trained.canonical_variables()[name].numpy(),
        moe.canonical_variables()[name].numpy(),
    )
    # One more epoch: resumes from the checkpoint at step 4.
    more = [*args[:-4], "--epochs=3", *args[-3:]]
    resumed = _json_line(check_ok(run_app("train", *more, data_dir=data_dir)))
    assert resumed["resumed_from_step"] == 4 and resumed["steps"] == 6
    history = json.loads((train_dir / "history.json").read_text())
    assert len(history["loss"]) == 1
    assert _epoch_scalars(train_dir / "logs" / "train")["epoch_loss"][-1] == (
        pytest.approx(history["loss"][0], rel=1e-6)
    )
    # A mesh whose size is not the number of devices fails before work.
    process = run_app(
        "train", *args[:-6], "--mesh=batch:2,expert:2", "--cpu_devices=2"
    )
    assert process.returncode != 0
    assert "--mesh='batch:2,expert:2'" in process.stderr
    assert "4 devices but 2 are available" in process.stderr


def _epoch_scalars(log_dir):
    """{tag: [values by step]} of the scalars in a TensorBoard directory."""
    found = {}
    for name in sorted(os.listdir(log_dir)):
        if "tfevents" not in name:
            continue
        for event in tf.compat.v1.train.summary_iterator(
            os.path.join(log_dir, name)
        ):
            for value in event.summary.value:
                if value.tag.startswith("epoch_"):
                    found.setdefault(value.tag, {})[event.step] = float(
                        tf.make_ndarray(value.tensor)
                    )
    return {tag: [v for _, v in sorted(d.items())] for tag, d in found.items()}


def _check_tensorboard_logs(log_dir):
    """Losses in fit's logs; per-layer routing statistics in routing/."""
    tags = set()
    for root, _, files in os.walk(log_dir):
        for name in files:
            if "tfevents" in name:
                for event in tf.compat.v1.train.summary_iterator(
                    os.path.join(root, name)
                ):
                    tags.update(value.tag for value in event.summary.value)
    assert "epoch_loss" in tags, sorted(tags)
    for stat in ("dropped", "confidence", "max_load", "expert_usage"):
        assert f"routing/vit/block_1/mlp/{stat}" in tags, sorted(tags)


@pytest.mark.slow
def test_t5_launchers_end_to_end(data_dir, tmp_path):
    dense_dir = tmp_path / "dense_t5"
    pretrained = _json_line(
        check_ok(
            run_app(
                "train_dense",
                "--architecture=t5",
                "--epochs=1",
                "--steps_per_epoch=2",
                "--batch_size=8",
                "--eval_examples=16",
                f"--output_dir={dense_dir}",
                data_dir=data_dir,
                timeout=900,
            )
        )
    )
    assert "checkpoint" in os.listdir(dense_dir)  # original T5 layout
    dense = read_checkpoint(str(dense_dir))
    assert isinstance(dense, T5) and dense.num_encoder_layers == 2
    assert pretrained["test"]["examples"] == 16
    for key in ("token_accuracy", "exact_match"):
        assert 0.0 <= pretrained["test"][key] <= 1.0

    moe_file = tmp_path / "moe_t5.keras"
    check_ok(
        run_app(
            "upcycle",
            f"--checkpoint={dense_dir}",
            f"--output={moe_file}",
            "--num_experts=2",
            "--blocks=all",
            data_dir=data_dir,
        )
    )
    moe = keras.saving.load_model(moe_file, compile=False)
    assert sorted(moe.encoder_moe_blocks) == [0, 1]
    assert sorted(moe.decoder_moe_blocks) == [0, 1]
    results = _json_line(
        check_ok(
            run_app(
                "evaluate",
                f"--model={moe_file}",
                "--dataset=number_words",
                "--max_examples=16",
                data_dir=data_dir,
            )
        )
    )
    assert results["examples"] == 16
    # Random-ish model: the loss is near log V, far from 0.
    assert 0.5 * np.log(dense.vocab_size) < results["loss"] < 20


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
