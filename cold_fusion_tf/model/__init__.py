"""Models: the two bodies (transformers-TF :mod:`.bodies`, keras-hub :mod:`.keras_hub_body`) behind one
interface (:mod:`.body`), their mappings to Hugging Face tensor names, a base's config and
tokenizer, and base 0 from a source.
"""
