"""Embedded datasets as TFDS builders, a SentencePiece vocabulary, pipelines.

Everything here is built offline from data that ships inside installed
packages (scikit-learn's digits, num2words, CPython's `pydoc_data`); nothing
is ever downloaded.

Datasets (`DATASETS`), each a `tfds.core.GeneratorBasedBuilder`:

* `digits`: 1,797 real 8x8 handwritten digits, `train` 1,437 / `test` 360.
* `composed_digits`: two digits side by side, 100 classes, `train` 20,000 /
  `test` 2,000; test images are made only from `digits` test images.
* `number_words`: "translate to French: 21" -> "vingt et un" for 0..9999 in
  en, fr, de, es; `train` 32,000 / `validation` 4,000 / `test` 4,000, with
  disjoint numbers.
* `pydoc_corpus`: paragraphs of CPython's pydoc topics (about 65k words),
  `train` / `validation` split by topic (2,190 / 417 on Python 3.11.7).

`prepare(name)` builds a dataset once into `default_data_dir()` (or the
given `data_dir`); `load(name, split)` returns its feature dicts. The
SentencePiece model (`tokenizer()`, `sentencepiece_model_path()`) is trained
at prepare time on the text datasets, with T5's ids: pad 0, eos 1, unk 2 and
`NUM_EXTRA_IDS` sentinels at the top of the `VOCAB_SIZE` vocabulary.

Pipelines: `classification_dataset`, `seq2seq_dataset` (T5 inputs; the
longest `number_words` sequence is 12 tokens on each side, EOS included),
`span_corruption_dataset` (T5 pre-training objective). Every split is read
in a fixed order; shuffling is the pipelines' `shuffle=True, seed=...`.
"""

from keras_moe.data.pipelines import classification_dataset
from keras_moe.data.pipelines import seq2seq_dataset
from keras_moe.data.pipelines import seq2seq_lengths
from keras_moe.data.registry import DATASETS
from keras_moe.data.registry import SPLITS
from keras_moe.data.registry import available
from keras_moe.data.registry import default_data_dir
from keras_moe.data.registry import load
from keras_moe.data.registry import prepare
from keras_moe.data.shuffle import reproducible_shuffle
from keras_moe.data.span_corruption import corrupt_spans
from keras_moe.data.span_corruption import noise_span_mask
from keras_moe.data.span_corruption import span_corruption_dataset
from keras_moe.data.span_corruption import span_corruption_lengths
from keras_moe.data.text import LANGUAGES
from keras_moe.data.vocabulary import EOS_ID
from keras_moe.data.vocabulary import NUM_EXTRA_IDS
from keras_moe.data.vocabulary import PAD_ID
from keras_moe.data.vocabulary import SENTENCEPIECE_VOCAB_SIZE
from keras_moe.data.vocabulary import UNK_ID
from keras_moe.data.vocabulary import VOCAB_SIZE
from keras_moe.data.vocabulary import sentencepiece_model_path
from keras_moe.data.vocabulary import sentinel_id
from keras_moe.data.vocabulary import tokenizer
