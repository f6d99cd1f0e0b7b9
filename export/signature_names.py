"""Names of the exported signatures, their inputs and their outputs.

Plain strings, shared by the adapters that build the signatures and by the
client helpers that address them: a client imports this module (through
`export.client`) without Keras or keras_moe.

Every exported model has `serving_default` and `serving_xla` (the fixed-shape
function TPU inference converters compile; see `export.adapters`). The
others depend on the model type:

    image classifiers (ViT):
        serving_default, predict_images_uint8, predict_images_float32
            images          -> probabilities, top_k_class_ids,
                               top_k_probabilities
        predict_image_bytes
            image_bytes     -> the same three outputs
    T5:
        serving_default     encoder_token_ids -> output_token_ids
        generate_text       text -> output_text   (with a SentencePiece model)
"""

SERVING_DEFAULT = "serving_default"
SERVING_XLA = "serving_xla"
# The alias TPU inference converters look for in
# `MetaInfoDef.function_aliases` (Cloud TPU inference converter convention).
TPU_FUNCTION_ALIAS = "tpu_func"

# Image classifiers.
PREDICT_IMAGES_UINT8 = "predict_images_uint8"
PREDICT_IMAGES_FLOAT32 = "predict_images_float32"
PREDICT_IMAGE_BYTES = "predict_image_bytes"
IMAGES = "images"
IMAGE_BYTES = "image_bytes"
PROBABILITIES = "probabilities"
TOP_K_CLASS_IDS = "top_k_class_ids"
TOP_K_PROBABILITIES = "top_k_probabilities"

# Encoder-decoder text models.
GENERATE_TEXT = "generate_text"
GENERATE_BEAM_SEARCH = "generate_beam_search"
ENCODER_TOKEN_IDS = "encoder_token_ids"
OUTPUT_TOKEN_IDS = "output_token_ids"
TEXT = "text"
OUTPUT_TEXT = "output_text"
