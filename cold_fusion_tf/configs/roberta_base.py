"""The paper's setting with RoBERTa-base: 36 datasets, 8 contributors per iteration, 30
iterations, the ColD Fusion fine-tuning recipe (the released ``ibm/ColD-Fusion``).

Create the store and run the whole loop (on one machine, or let each contributor run
elsewhere with ``cold_fusion_tf.train`` and the fuser with ``cold_fusion_tf.fuse``):

  python -m cold_fusion_tf.run --config=configs/roberta_base.py --store=gs://BUCKET/cf-roberta

One contributor, on a Cloud TPU VM, a multi-GPU machine or a TF_CONFIG cluster:

  python -m cold_fusion_tf.train --config=configs/roberta_base.py \
      --store=gs://BUCKET/cf-roberta --workdir=gs://BUCKET/work/sst2 \
      --config.task=tfds:glue/sst2 --config.strategy=auto [--config.tpu=local]

The fuser, once per iteration (or --watch):

  python -m cold_fusion_tf.fuse --config=configs/roberta_base.py --store=gs://BUCKET/cf-roberta

Datasets: the 19 that TensorFlow Datasets has are read through TFDS (``tfds:...``; they
download on first use). The other 17 are folders named as in ``FOLDER_DATASETS`` in one of
``config.data.dirs`` (default ``./data``), in the package's JSONL/CSV/TSV folder format
(``train``/``dev``/``test`` splits; see the README). Several of them (isear, rotten_tomatoes,
trec_coarse, trec_fine, tweet_eval_*) are ready-made in ``../shared/data``. COPA and MultiRC
are read from TFDS as sentence pairs of their first two text fields.

Recipe (the paper): AdamW, peak learning rate 5e-5, linear schedule with 0.6% warm-up, weight
decay 0.01 (none on LayerNorm weights and biases), batch 256 (accumulated from micro-batches
of at most 32 per replica when it does not fit), at most 10 epochs, evaluation on dev every
25,600 examples with early stopping after 128,000 examples without gain, the best dev
checkpoint restored before the body is uploaded. Sequences are cut at 256 tokens.
"""

from cold_fusion_tf.configs import defaults as common

TFDS_DATASETS = (
    "tfds:glue/cola", "tfds:glue/sst2", "tfds:glue/mrpc", "tfds:glue/qqp", "tfds:glue/stsb",
    "tfds:glue/mnli", "tfds:glue/qnli", "tfds:glue/rte", "tfds:glue/wnli",
    "tfds:super_glue/boolq", "tfds:super_glue/cb", "tfds:super_glue/copa",
    "tfds:super_glue/multirc", "tfds:super_glue/wic",
    "tfds:anli", "tfds:snli", "tfds:esnli", "tfds:imdb_reviews", "tfds:ag_news_subset",
)
FOLDER_DATASETS = (
    "20_newsgroup", "amazon_reviews_multi", "dbpedia", "financial_phrasebank", "isear",
    "poem_sentiment", "rotten_tomatoes", "sick", "trec_coarse", "trec_fine",
    "tweet_eval_emoji", "tweet_eval_emotion", "tweet_eval_hate", "tweet_eval_irony",
    "tweet_eval_offensive", "tweet_eval_sentiment", "yahoo_answers_topics",
)
DATASETS = TFDS_DATASETS + FOLDER_DATASETS  # 36


def paper_recipe(learning_rate: float):
  """The ColD Fusion fine-tuning recipe at a given peak learning rate."""
  return common.recipe(
      learning_rate=learning_rate, warmup_fraction=0.006, weight_decay=0.01, clip_norm=1.0,
      batch_size=256, max_replica_batch=32, eval_batch_size=256, epochs=10.0,
      max_length=256, eval_every_examples=25_600, patience_examples=128_000,
      steps_per_execution=16, length_buckets=8, checkpoint_every_steps=200,
      log_every_seconds=60.0)


def get_config(model: str = "roberta-base", learning_rate: float = 5e-5):
  config = common.get_config()
  config.model.source = model
  config.data.dirs = ("data",)
  config.pool = DATASETS
  config.heldout = ()
  config.iterations = 30
  config.contributors_per_iteration = 8
  config.fusion.method = "mean"  # the paper: the plain uniform mean of the bodies
  config.recipe = paper_recipe(learning_rate)
  config.eval.recipe = paper_recipe(learning_rate)
  config.eval.seeds = 5
  config.eval.every = 5  # the paper's curves: every 5th base (and the last) on all 36 tasks
  return config
