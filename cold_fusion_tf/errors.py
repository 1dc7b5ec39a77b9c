"""The one exception type that carries a message meant for the person running a program."""


class UserError(Exception):
  """Bad input (data, config, store contents, flags): the message says what and how to fix it.

  Entry points print the message alone (no stack trace) and exit with status 2.
  """


class LimitError(UserError):
  """A limit of this process or machine (open files, disk) was reached, or the storage service
  failed (unreachable, credentials, permissions): the input is not at fault, so nothing is
  rejected for it."""
