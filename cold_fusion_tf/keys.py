"""Signing keys: create a contributor's key pair, or list a public key in a store.

  python -m cold_fusion_tf.keys --id=alice --private_key=alice.key
      writes alice.key (the private key: the contributor keeps it and trains with
      --config.signing_key=alice.key) and prints the line the store's owner adds to
      <store>/contributors.json
  python -m cold_fusion_tf.keys --store=gs://bucket/run --id=alice --public_key=ed25519:...
      the store's owner lists alice's key in <store>/contributors.json (created if missing)

Once a store has contributors.json, the fuser counts only contributions of the ids listed
there whose contribution.json is signed with the listed key.
"""

from absl import flags

from cold_fusion_tf import cli

cli.define_flags(default_config=None)
flags.DEFINE_string("id", None, "The contributor id the key is for.")
flags.DEFINE_string("private_key", None, "Where to write a new private key (refused if it exists).")
flags.DEFINE_string("public_key", None, "With --store: the 'ed25519:...' key to list for --id.")


def main(argv):
  del argv

  def body():
    from cold_fusion_tf.errors import UserError  # pylint: disable=g-import-not-at-top
    from cold_fusion_tf.store import signing  # pylint: disable=g-import-not-at-top
    from cold_fusion_tf.store import paths  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.id:
      raise UserError("--id is required: the contributor id the key is for (e.g. --id=alice).")
    cid = paths.check_path_part(flags.FLAGS.id, "--id")
    if flags.FLAGS.public_key and flags.FLAGS.private_key:
      raise UserError("--private_key (create a key pair) and --public_key (list a key in a "
                      "store) are two different uses: give one of them.")
    if flags.FLAGS.store and not flags.FLAGS.public_key:
      raise UserError(f"--store={flags.FLAGS.store} is given without --public_key: pass "
                      "--public_key=ed25519:... to list a key there, or drop --store to "
                      "create a key pair.")
    if flags.FLAGS.public_key:
      from cold_fusion_tf import store as store_lib  # pylint: disable=g-import-not-at-top
      store = store_lib.Store(cli.require_store())
      signing.add_key(store, cid, flags.FLAGS.public_key)
      cli.say(f"{store.uri}/contributors.json lists {cid}; only listed contributors' signed "
              "contributions count from now on.")
      return
    if not flags.FLAGS.private_key:
      raise UserError("pass --private_key=FILE to create a key pair, or --store and --public_key to "
                      "list a key.")
    line = signing.create_key(flags.FLAGS.private_key, cid)
    cli.say(f"wrote the private key of {cid} to {flags.FLAGS.private_key}: keep it secret, and "
            f"contribute with --config.signing_key={flags.FLAGS.private_key}")
    cli.say("the store's owner lists it with:")
    cli.say(f"  python -m cold_fusion_tf.keys --store=STORE --id={cid} --public_key={line}")
    cli.say('or adds this line to the "contributors" object of STORE/contributors.json:')
    cli.say(f'  "{cid}": "{line}"')

  cli.run_main(body)


if __name__ == "__main__":
  cli.run(main)
