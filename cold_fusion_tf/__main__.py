"""``python -m cold_fusion_tf <program> [flags]``: the ``cold-fusion`` command."""

from cold_fusion_tf.console import main

main()
