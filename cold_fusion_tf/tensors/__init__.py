"""Tensors on disk: safetensors files read and written chunk by chunk (:mod:`.safetensors_io`)
and the streaming passes over bodies that validation and fusion make (:mod:`.streaming`).
"""
