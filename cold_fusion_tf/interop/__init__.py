"""Using a published base elsewhere: tf-keras models (:mod:`.keras_api`), keras-hub presets
(:mod:`.keras_hub`), exported model directories with model cards (:mod:`.export`,
:mod:`.model_card`).
"""
