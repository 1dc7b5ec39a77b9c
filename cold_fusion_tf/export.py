"""Export a published base as a self-contained model directory with a model card.

  python -m cold_fusion_tf.export --store=stores/demo --out=exported/demo \\
      [--iteration=N] [--format=hf|keras_hub] [--license=mit]

``--format=hf`` (default): a Hugging Face directory; ``--format=keras_hub``: a keras-hub preset
(see :mod:`cold_fusion_tf.interop.export`).
"""

from absl import app
from absl import flags

from cold_fusion_tf import cli
from cold_fusion_tf.errors import UserError
from cold_fusion_tf.interop import model_card
from cold_fusion_tf.interop.export import FORMATS, export_model

def define_flags() -> None:
  """The program's flags (defined only when run, so importing this module defines none)."""
  cli.define_flags()  # --config (unused here, accepted like every program's) and --store
  flags.DEFINE_string("out", None, "Output directory (new or empty).")
  flags.DEFINE_integer("iteration", None, "Which base (default: the latest).", lower_bound=0)
  flags.DEFINE_enum("format", "hf", FORMATS, "hf: Hugging Face directory; keras_hub: "
                    "keras-hub preset.")
  flags.DEFINE_string("license", "other", "License named in the model card (that of the "
                      "source model, e.g. mit or apache-2.0).")
  flags.register_validator("license", model_card.valid_license,
                           f"{model_card.LICENSE_HELP}.")
  flags.DEFINE_integer("sequence_length", None, "keras_hub: the preprocessor's sequence "
                       "length (default: the model's longest, at most 512).", lower_bound=2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = flags.FLAGS

  def body():
    if not config.out:
      raise UserError("--out is required: the directory to write.")
    if config.sequence_length is not None and config.format != "keras_hub":
      raise UserError(f"--sequence_length={config.sequence_length} sets the keras-hub "
                      f"preprocessor; --format={config.format} has none: drop it, or pass "
                      "--format=keras_hub.")
    export_model(cli.require_store(), config.out, config.iteration, config.format,
                 config.license, config.sequence_length, log=cli.say)

  cli.run_main(body, tensorflow=config.format == "keras_hub")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
