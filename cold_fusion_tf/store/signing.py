"""Who may contribute: Ed25519 public keys listed by the store's owner, signed contributions.

The owner lists contributors in ``contributors.json`` beside ``run.json``::

  {"format_version": 1,
   "contributors": {"alice": "ed25519:<base64 of the 32-byte public key>", ...}}

A contributor signs its ``contribution.json`` (which names the base it started from and the
sha256 of its body) with its private key: the ``signature`` field is the base64 Ed25519
signature of the file's canonical bytes without that field (:func:`signed_bytes`). Where the
file exists, the fuser counts only contributions of listed ids whose signature verifies with
the listed key. Without it, anyone who can write under ``contributions/`` may contribute.
"""

from __future__ import annotations

import base64
import binascii
import os
from typing import Optional

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from cold_fusion_tf.errors import UserError
from cold_fusion_tf.store import layout
from cold_fusion_tf.store import paths
from cold_fusion_tf.store import untrusted

KEY_PREFIX = "ed25519:"
MAX_CONTRIBUTORS = 100_000


def signed_bytes(meta: dict) -> bytes:
  """What a signature covers: the contribution.json fields but ``signature``, canonically."""
  return layout.json_bytes({k: v for k, v in meta.items() if k != "signature"})


def public_key_text(key: ed25519.Ed25519PublicKey) -> str:
  """``ed25519:<base64>``: how contributors.json lists a key."""
  raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
  return KEY_PREFIX + base64.b64encode(raw).decode()


def parse_public_key(text, where: str) -> ed25519.Ed25519PublicKey:
  if not isinstance(text, str) or not text.startswith(KEY_PREFIX):
    raise UserError(f"{where}: {untrusted.printable(text, 80)!r} is not an "
                    f"'{KEY_PREFIX}<base64>' public key.")
  try:
    raw = base64.b64decode(text[len(KEY_PREFIX):], validate=True)
    return ed25519.Ed25519PublicKey.from_public_bytes(raw)
  except (binascii.Error, ValueError):
    raise UserError(f"{where}: {untrusted.printable(text, 80)!r} is not a valid Ed25519 public "
                    "key (32 bytes, base64).") from None


def load_private_key(path: str) -> ed25519.Ed25519PrivateKey:
  """A private key file written by ``python -m cold_fusion_tf.keys`` (PEM, PKCS#8)."""
  try:
    data = untrusted.read_regular(path, 64 << 10)
  except FileNotFoundError:
    raise UserError(f"--config.signing_key={path}: no such file.") from None
  try:
    key = serialization.load_pem_private_key(data, password=None)
  except (ValueError, TypeError) as e:
    raise UserError(f"--config.signing_key={path}: not an unencrypted PEM private key ({e}). "
                    "Create one with `python -m cold_fusion_tf.keys --id=NAME`.") from None
  if not isinstance(key, ed25519.Ed25519PrivateKey):
    raise UserError(f"--config.signing_key={path}: not an Ed25519 key.")
  return key


def private_key_pem(key: ed25519.Ed25519PrivateKey) -> bytes:
  return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                           serialization.NoEncryption())


def sign(meta: dict, key: ed25519.Ed25519PrivateKey) -> str:
  return base64.b64encode(key.sign(signed_bytes(meta))).decode()


def check_keys(obj: dict, where: str) -> dict:
  """Schema of contributors.json: {id: public key}."""
  if obj.get("format_version") != layout.FORMAT_VERSION:
    raise UserError(f"{where}: format_version {obj.get('format_version')!r} is not "
                    f"{layout.FORMAT_VERSION}.")
  listed = obj.get("contributors")
  if not isinstance(listed, dict) or len(listed) > MAX_CONTRIBUTORS:
    raise UserError(f"{where}: 'contributors' must be an object of id: public key.")
  return {paths.check_path_part(cid, f"{where}: contributor id"):
          parse_public_key(key, f"{where}: key of {cid}") for cid, key in listed.items()}


def load_keys(store) -> Optional[dict]:
  """{contributor id: public key} from the store's contributors.json, or None without one."""
  name = layout.CONTRIBUTORS_FILE
  try:
    data = store.storage.read_bytes(name, layout.MAX_JSON_BYTES)
  except FileNotFoundError:
    return None
  where = f"{store.uri}/{name}"
  return check_keys(layout.parse_json(data, where), where)


def problem(meta: dict, keys: Optional[dict]) -> Optional[str]:
  """Why a contribution does not count under ``keys`` (None: it does, or no keys listed)."""
  if keys is None:
    return None
  cid = meta["contributor_id"]
  key = keys.get(cid)
  if key is None:
    return f"contributor {cid} is not listed in {layout.CONTRIBUTORS_FILE}"
  signature = meta.get("signature")
  if not isinstance(signature, str):
    return (f"unsigned, and {layout.CONTRIBUTORS_FILE} lists keys: the contributor must "
            "sign (--config.signing_key)")
  try:
    key.verify(base64.b64decode(signature, validate=True), signed_bytes(meta))
  except (binascii.Error, ValueError, InvalidSignature):
    return f"the signature does not verify with the key {layout.CONTRIBUTORS_FILE} lists for {cid}"
  return None


def signer(store, contributor_id: str, key_path: str):
  """How a contributor signs for ``store``: ``sign(meta) -> signature`` or None (no key and
  none needed). Checked before any training: a store that lists keys needs this id listed
  and a private key that matches the listed public key."""
  keys = load_keys(store)
  if not key_path:
    if keys is not None:
      raise UserError(f"{store.uri} accepts only signed contributions "
                      f"({layout.CONTRIBUTORS_FILE} lists the contributors' keys): pass "
                      "--config.signing_key=<your private key file>.")
    return None
  key = load_private_key(key_path)
  if keys is not None:
    listed = keys.get(contributor_id)
    if listed is None:
      raise UserError(f"{store.uri}/{layout.CONTRIBUTORS_FILE} does not list contributor "
                      f"{contributor_id!r}; ask the store's owner to add the line printed by "
                      "`python -m cold_fusion_tf.keys`.")
    if public_key_text(listed) != public_key_text(key.public_key()):
      raise UserError(f"--config.signing_key={key_path} is not the key "
                      f"{layout.CONTRIBUTORS_FILE} lists for {contributor_id!r}.")
  return lambda meta: sign(meta, key)


def create_key(path: str, contributor_id: str) -> str:
  """Writes a new private key to ``path`` (owner-only, never over an existing file): the
  ``ed25519:...`` public key to list for ``contributor_id``."""
  del contributor_id  # the key is bound to the id by the store's list, not by the key
  key = ed25519.Ed25519PrivateKey.generate()
  try:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
  except FileExistsError:
    raise UserError(f"--private_key={path} exists; choose another file (keys are never "
                    "overwritten).") from None
  except OSError as e:
    raise UserError(f"--private_key={path}: cannot create it ({e.strerror}).") from None
  with os.fdopen(fd, "wb") as f:
    f.write(private_key_pem(key))
  return public_key_text(key.public_key())


def add_key(store, contributor_id: str, public_key: str) -> None:
  """Lists ``public_key`` for ``contributor_id`` in the store's contributors.json
  (compare-and-swap, so concurrent additions are not lost)."""
  paths.check_path_part(contributor_id, "Contributor id")
  parse_public_key(public_key, "--public_key")
  store.run_info()
  name = layout.CONTRIBUTORS_FILE
  for _ in range(5):
    raw, token = store.storage.read_versioned(name)
    listed = {"format_version": layout.FORMAT_VERSION, "contributors": {}}
    if raw is not None:
      listed = layout.parse_json(raw, f"{store.uri}/{name}")
      check_keys(listed, f"{store.uri}/{name}")
    listed["contributors"][contributor_id] = public_key
    data = layout.json_bytes(listed)
    if (store.storage.create_exclusive(name, data) if raw is None
        else store.storage.compare_and_swap(name, data, token)):
      return
  raise UserError(f"{store.uri}/{name}: kept changing; run again.")
