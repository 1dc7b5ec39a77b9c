"""The whole loop on one machine (:mod:`.loop`) and its TensorBoard scalars (:mod:`.scalars`).
"""
