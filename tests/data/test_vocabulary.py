"""The SentencePiece vocabulary: T5 ids, round trips, graph use."""

import sys

import pytest
import sentencepiece
import tensorflow as tf
import tensorflow_datasets as tfds

import keras_moe.data as kd
from export.t5_serving import check_sentencepiece_model
from keras_moe.models import t5


@pytest.fixture(scope="module")
def processor(data_dir):
    sp = sentencepiece.SentencePieceProcessor()
    sp.Load(kd.sentencepiece_model_path(data_dir))
    return sp


def _texts(data_dir, name, split, keys, every=1):
    ds = kd.load(name, split, data_dir)
    return [
        ex[key].decode()
        for i, ex in enumerate(tfds.as_numpy(ds))
        if i % every == 0
        for key in keys
    ]


def test_t5_ids_and_size(data_dir, processor):
    assert (processor.pad_id(), processor.eos_id(), processor.unk_id()) == (
        0,
        1,
        2,
    )
    assert processor.bos_id() == -1
    assert processor.vocab_size() == kd.SENTENCEPIECE_VOCAB_SIZE == 2000
    assert (kd.PAD_ID, kd.EOS_ID) == (t5.PAD_ID, t5.EOS_ID)
    assert t5.DECODER_START_ID == kd.PAD_ID
    path = kd.sentencepiece_model_path(data_dir)
    assert path.endswith(".model") and path.startswith(data_dir)
    with open(path, "rb") as f:
        proto = f.read()
    # What the T5 text export accepts, for a model of VOCAB_SIZE ids.
    assert check_sentencepiece_model(proto, kd.VOCAB_SIZE) == 2000


def test_sentinels_at_the_top():
    assert kd.VOCAB_SIZE == 2100 and kd.NUM_EXTRA_IDS == 100
    assert kd.sentinel_id(0) == 2099
    assert kd.sentinel_id(99) == 2000 == kd.SENTENCEPIECE_VOCAB_SIZE
    for bad in (-1, 100, 1.0, "3", None):
        with pytest.raises(ValueError, match=r"an int in \[0, 100\)"):
            kd.sentinel_id(bad)


def test_round_trip(data_dir, processor):
    tokenizer = kd.tokenizer(data_dir)
    seen = _texts(data_dir, "pydoc_corpus", "train", ["text"], every=7)
    seen += _texts(data_dir, "number_words", "test", ["inputs", "targets"])
    held_out = _texts(data_dir, "pydoc_corpus", "validation", ["text"])
    for texts, unknown_at_most in ((seen, 0), (held_out, 5)):
        ids = tokenizer.tokenize(tf.constant(texts))
        # tf-text and the SentencePiece library agree on every id.
        assert ids.to_list() == processor.EncodeAsIds(texts)
        back = [t.decode() for t in tokenizer.detokenize(ids).numpy()]
        # Exact, except for characters never seen in training (unk).
        has_unk = [kd.UNK_ID in row for row in ids.to_list()]
        assert sum(has_unk) <= unknown_at_most
        for text, decoded, unk in zip(texts, back, has_unk):
            assert (decoded == text) != unk, (text, decoded)
        flat = ids.flat_values.numpy()
        assert flat.min() >= kd.UNK_ID > kd.EOS_ID
        assert flat.max() < kd.SENTENCEPIECE_VOCAB_SIZE
    assert processor.EncodeAsIds("°") == [3, kd.UNK_ID]


def test_digits_are_single_pieces(data_dir, processor):
    pieces = processor.EncodeAsPieces("translate to German: 4213")
    assert pieces[-4:] == ["4", "2", "1", "3"]
    assert processor.DecodeIds(processor.EncodeAsIds("vingt et un")) == (
        "vingt et un"
    )


def test_tokenizer_in_a_graph(data_dir, processor):
    tokenizer = kd.tokenizer(data_dir)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def encode(text):
        return tokenizer.tokenize(text).to_tensor()

    got = encode(tf.constant(["translate to Spanish: 21"])).numpy()[0]
    assert got.tolist() == processor.EncodeAsIds("translate to Spanish: 21")


def test_tokenizer_after_seeding(data_dir, processor):
    # Seeding clears TensorFlow's resources: a tokenizer made afterwards
    # still works.
    tf.random.set_seed(3)
    ids = kd.tokenizer(data_dir).tokenize(["quatre mille"]).to_list()[0]
    assert ids == processor.EncodeAsIds("quatre mille")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
