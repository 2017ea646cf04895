"""What the command lines do with an error they can name before any work: one line on stderr, exit status 2.

    from experiments import cli
    cli.run(main)                                   # instead of app.run(main)
    spec = cli.json_value('--grid', FLAGS.grid)     # a JSON error names the flag, the line and the column

`run` prints a flag that fails to parse and an `app.UsageError` raised by main as `error: <message>` (the message
names the flag, its value and the fix) and exits with status 2, without absl's help text or a traceback; every
other exception keeps its traceback.
"""

from __future__ import annotations

import json
import pathlib
import re
import sys
from typing import Any, NoReturn

from absl import app, flags

USAGE = 2  # the exit status of a command line given something it refuses


def fail(message: str) -> NoReturn:
  """Prints `error: message` on stderr and exits with status 2."""
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(USAGE)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a malformed or out-of-range flag printed as one line (`fail`)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(str(e))


def run(main) -> None:
  """`app.run(main)`, with flag errors and the `app.UsageError`s main raises printed as one line, exit status 2."""
  def checked(argv):
    try:
      return main(argv)
    except app.UsageError as e:
      fail(str(e))
  app.run(checked, flags_parser=parse_flags)


def as_flag(message: str) -> str:
  """A library message naming a setting as a keyword (`model='x': ...`, `out_of_core=True: ...`, `recipe: ...`)
  as the command line's flag of the same name (`--model='x': ...`, `--recipe: ...`)."""
  if message.startswith('recipe: '):
    return '--' + message
  return '--' + message if re.match(r'[a-z_]+=', message) else message


def json_value(flag: str, text: str) -> Any:
  """The JSON value of a flag's text; a ValueError naming the flag, the line and column and the fix."""
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f'{flag}={text!r} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}; write '
                     'JSON (double-quoted strings, no trailing commas).') from None


def json_file(flag: str, path: str | pathlib.Path) -> Any:
  """The JSON value of the file a flag names; a ValueError naming the flag, the file, the line and column."""
  file = pathlib.Path(path).expanduser()
  if not file.is_file():
    raise ValueError(f"{flag}={str(path)!r}: no such file; give an existing JSON file.")
  try:
    return json.loads(file.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{flag}={str(path)!r}: '{file}' is not valid JSON: {e.msg} at line {e.lineno}, column "
                     f'{e.colno}; write JSON (double-quoted strings, no trailing commas).') from None
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f"{flag}={str(path)!r}: cannot read '{file}' ({type(e).__name__}: {e}).") from None
