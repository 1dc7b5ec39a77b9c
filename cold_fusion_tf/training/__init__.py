"""Training a contributor: the typed :class:`~.recipe.Recipe`, the ``tf.distribute`` strategy, inputs,
optimizer, the trainers (transformers-TF and Keras 3), checkpoints, metrics, and the
contributor that uploads a body.
"""
