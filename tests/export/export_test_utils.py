"""Helpers of the export tests: models, a tokenizer, the serving harness."""

import io
import os
import pathlib
import pickle
import pydoc_data.topics
import subprocess
import sys

import numpy as np
import sentencepiece

ROOT = pathlib.Path(__file__).resolve().parents[2]
HARNESS = pathlib.Path(__file__).with_name("serving_harness.py")


def subprocess_env():
    env = dict(os.environ)
    env.update(KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    return env


def randomize(model, seed, scale=0.3):
    """Adds Normal(0, scale) noise to every weight (zero-initialised heads,
    unit norm scales and identical experts make weak tests)."""
    rng = np.random.default_rng(seed)
    for weight in model.weights:
        noise = rng.normal(size=weight.shape) * scale
        weight.assign(weight.numpy() + noise.astype(weight.dtype))
    return model


def train_sentencepiece(vocab_size=120, **overrides):
    """A small unigram SentencePiece model (bytes) trained on CPython's
    `pydoc_data.topics`, with T5's ids: pad 0, eos 1, unk 2, no bos."""
    sentences = [
        line.strip()
        for text in pydoc_data.topics.topics.values()
        for line in text.splitlines()
        if line.strip()
    ][:3000]
    options = dict(
        vocab_size=vocab_size,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        model_type="unigram",
        character_coverage=0.995,
        num_threads=1,
        minloglevel=2,
    )
    options.update(overrides)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, **options
    )
    return model.getvalue()


def softmax(logits):
    logits = np.asarray(logits, np.float64)
    exp = np.exp(logits - logits.max(-1, keepdims=True))
    return exp / exp.sum(-1, keepdims=True)


def run_harness(work_dir, job, timeout=600):
    """Runs `serving_harness.py` on `job` in a fresh process; its output."""
    work_dir = pathlib.Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    in_path, out_path = work_dir / "job.pkl", work_dir / "result.pkl"
    with open(in_path, "wb") as f:
        pickle.dump(job, f)
    # cwd is not the repository: nothing of the project is importable there.
    process = subprocess.run(
        [sys.executable, str(HARNESS), str(in_path), str(out_path)],
        cwd=work_dir,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if process.returncode != 0:
        raise AssertionError(
            f"serving harness failed ({process.returncode}):\n"
            f"{process.stderr[-4000:]}"
        )
    with open(out_path, "rb") as f:
        return pickle.load(f)
