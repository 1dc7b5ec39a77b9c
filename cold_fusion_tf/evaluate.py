"""Model recycling: how good a base is to fine-tune from, against a reference model.

  python -m cold_fusion_tf.evaluate --config=configs/demo.py --base=stores/demo \\
      --tasks=heldout,pool --seeds=3 --out=results/demo

Fine-tunes every model (the reference and each --base) on every task with a fresh head and
the same recipe (config.eval.recipe) and seeds, and reports per task the mean and standard
deviation of the test score (accuracy; Spearman for regression) over seeds, the unweighted
average, and each base's gain over the reference, paired by seed, with standard errors: per
task (a task losing more than two standard errors is flagged) and per group (over seeds and
over tasks), and the verdict (a gain needs the mean above two standard errors and no flagged
loss; one seed is an illustration).

  --base       STORE (its LATEST base), STORE@N, a Hugging Face model directory or
               package:<module>/<folder>; several, comma-separated
  --reference  the same kinds; default STORE@0 when --base is a store
  --tasks      dataset names (found in config.data.dirs), pool, pool:N (its first N), heldout
               or all (the default)
  --seeds      seeds per (model, task); default config.eval.seeds
  --mode       finetune (the whole model) or probe (frozen body, head only: "ColD-Frozen",
               learning rate config.eval.probe_learning_rate)
  --out        the results directory: results.jsonl (one line per finished run, reused by
               later evaluations), summary.json/.csv/.md and gains.png
  --store      shorthand: --base=STORE (so --reference=STORE@0)
"""

from absl import flags

from cold_fusion_tf import cli

cli.define_flags()
flags.DEFINE_string("base", None, "Model(s) to evaluate: STORE, STORE@N or a model directory; "
                    "comma-separated.")
flags.DEFINE_string("reference", None, "The model to compare against (default STORE@0).")
flags.DEFINE_string("tasks", "all", "Dataset names, or pool / pool:N / heldout / all, comma-separated.")
flags.DEFINE_integer("seeds", None, "Seeds per (model, task) (default config.eval.seeds).",
                     lower_bound=1)
flags.DEFINE_enum("mode", "finetune", ["finetune", "probe"],
                  "finetune: train the whole model; probe: frozen body, head only.")
flags.DEFINE_string("out", None, "Results directory (local).")


def main(argv):
  del argv

  def body():
    from cold_fusion_tf.evaluation import pipeline as recycling  # pylint: disable=g-import-not-at-top
    from cold_fusion_tf.errors import UserError  # pylint: disable=g-import-not-at-top
    f = flags.FLAGS
    if not f.tasks.strip(" ,"):
      raise UserError(f"--tasks={f.tasks!r} names no task: give dataset names, or pool, "
                      "pool:N, heldout or all (the default).")
    if f.base and f.store and f.base != f.store:
      raise UserError(f"--base={f.base} and --store={f.store}: --store is a shorthand for "
                      "--base=STORE; give one of them.")
    bases = (f.base or f.store or "").split(",")
    recycling.evaluate(cli.require_config(), bases, f.reference, f.tasks, f.seeds, f.mode,
                       f.out, log=cli.say)

  cli.run_main(body, tensorflow=True)


if __name__ == "__main__":
  cli.run(main)
