"""The SentencePiece vocabulary of the embedded text datasets.

A unigram SentencePiece model of `SENTENCEPIECE_VOCAB_SIZE` pieces, trained
at prepare time on the `train` splits of `pydoc_corpus` (paragraphs) and
`number_words` (prompts and targets in every language), with T5's ids: pad
`PAD_ID` = 0, end of sequence `EOS_ID` = 1, unknown `UNK_ID` = 2, no
beginning-of-sequence piece. Digits are split into single pieces, so every
number is spelled digit by digit. Text is normalized with SentencePiece's
`nmt_nfkc` rule (Unicode NFKC, as `pydoc_corpus` is stored); every
character of the training text is covered, others become `UNK_ID`.

As in T5, `NUM_EXTRA_IDS` sentinel ids for span corruption sit above the
SentencePiece pieces, at the top of the model vocabulary: `sentinel_id(0)`
is `VOCAB_SIZE - 1`, `sentinel_id(1)` is `VOCAB_SIZE - 2`, ... A T5 over
this data takes `vocab_size=VOCAB_SIZE`. Sentinels are not SentencePiece
pieces: detokenize only ids below `SENTENCEPIECE_VOCAB_SIZE`.

The model is written once per data directory (atomically, under the data
directory's lock) to `sentencepiece_model_path(data_dir)`.
"""

import functools
import operator
import os

from keras_moe.data import registry
from keras_moe.utils.files import write_bytes

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
SENTENCEPIECE_VOCAB_SIZE = 2000
NUM_EXTRA_IDS = 100
VOCAB_SIZE = SENTENCEPIECE_VOCAB_SIZE + NUM_EXTRA_IDS
_MODEL_DIR = "keras_moe_sentencepiece"


def sentinel_id(index):
    """Returns the token id of sentinel `index` (T5's `<extra_id_{index}>`).

    Args:
        index: an int in [0, NUM_EXTRA_IDS).
    """
    try:
        position = operator.index(index)
    except TypeError:
        position = -1
    if not 0 <= position < NUM_EXTRA_IDS:
        raise ValueError(
            f"Sentinel index must be an int in [0, {NUM_EXTRA_IDS}); "
            f"received {index!r}"
        )
    return VOCAB_SIZE - 1 - position


def training_sentences(data_dir=None):
    """Returns the texts the SentencePiece model is trained on, in order.

    Args:
        data_dir: TFDS data directory; `default_data_dir()` if None.
            `pydoc_corpus` and `number_words` are prepared there if needed.

    Returns:
        A list of str: pydoc_corpus train paragraphs, then number_words
        train inputs and targets.
    """
    import tensorflow_datasets as tfds

    def texts(name, keys):
        ds = registry.load(name, "train", data_dir).batch(4096)
        for batch in tfds.as_numpy(ds):
            for row in zip(*(batch[key] for key in keys)):
                yield from (text.decode() for text in row)

    return [
        *texts("pydoc_corpus", ("text",)),
        *texts("number_words", ("inputs", "targets")),
    ]


def train_sentencepiece(sentences):
    """Trains the vocabulary's SentencePiece model on `sentences`.

    Args:
        sentences: a list of str.

    Returns:
        The serialized model proto (bytes).
    """
    import io

    import sentencepiece

    # Longest training sentence in bytes; SentencePiece skips longer ones.
    longest = max(len(s.encode()) for s in sentences)
    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=proto,
        model_type="unigram",
        vocab_size=SENTENCEPIECE_VOCAB_SIZE,
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        bos_id=-1,
        character_coverage=1.0,
        split_digits=True,
        max_sentence_length=longest + 1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        # One thread: the same model from the same text on every machine.
        num_threads=1,
        minloglevel=2,
    )
    return proto.getvalue()


def sentencepiece_model_path(data_dir=None):
    """Returns the path of the SentencePiece `.model` file, training it once.

    Args:
        data_dir: TFDS data directory; `default_data_dir()` if None.

    Returns:
        `<data_dir>/keras_moe_sentencepiece/sentencepiece_2000.model`; its
        bytes are the model proto T5's text export takes.
    """
    data_dir = registry.resolve_data_dir(data_dir)
    path = os.path.join(
        data_dir, _MODEL_DIR, f"sentencepiece_{SENTENCEPIECE_VOCAB_SIZE}.model"
    )
    if os.path.exists(path):
        return path
    # Prepare the training data before taking the lock `prepare` takes too.
    sentences = training_sentences(data_dir)
    with registry.data_dir_lock(data_dir):
        if os.path.exists(path):  # Another process trained it meanwhile.
            return path
        write_bytes(path, train_sentencepiece(sentences))
    return path


@functools.lru_cache(maxsize=8)
def _model_proto(path):
    with open(path, "rb") as f:
        return f.read()


def tokenizer(data_dir=None):
    """Returns a `tensorflow_text.SentencepieceTokenizer` of the vocabulary.

    It tokenizes without adding end-of-sequence ids (pipelines add
    `EOS_ID`), works in `tf.data` and inside exported graphs (load those
    with `import tensorflow_text`). Each call makes a new tokenizer (the
    model file is read once): `tf.random.set_seed` (and
    `keras.utils.set_random_seed`) clears TensorFlow's resources, which
    breaks tokenizers, and datasets using them, made before it. Seed first,
    then build tokenizers and datasets.

    Args:
        data_dir: TFDS data directory; `default_data_dir()` if None.

    Example:

    >>> import tempfile
    >>> sp = tokenizer(tempfile.mkdtemp())
    >>> ids = sp.tokenize(["vingt et un"])
    >>> sp.detokenize(ids).numpy()[0].decode()
    'vingt et un'
    """
    import tensorflow as tf
    import tensorflow_text

    proto = _model_proto(sentencepiece_model_path(data_dir))
    return tensorflow_text.SentencepieceTokenizer(
        model=proto, out_type=tf.int32, add_bos=False, add_eos=False
    )
