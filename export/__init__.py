"""SavedModel export of keras_moe models for TensorFlow Serving.

Modules (import the one you need; this package imports nothing, so that
`export.client` stays usable without Keras):

    saved_model          export_saved_model(): TF Serving layout, atomic
                         write, eval capacity factor, TPU function alias
    export_saved_model   the absl launcher (python -m export.export_saved_model)
    adapters             ServingAdapter, ServingOptions, register_adapter():
                         one adapter per model class builds its signatures
    vit_serving          image-classifier signatures (ViT)
    t5_serving           generation signatures (T5, with tf-text SentencePiece)
    signature_names      signature, input and output names
    client               PredictRequest protos and REST bodies
    serving_config       models.config and batching parameters files
    latency              SavedModel vs Keras latency

A new model type (E^3, a vision-language model) plugs in by registering a
`ServingAdapter` subclass for its class with `adapters.register_adapter`; see
`export.adapters`.
"""
