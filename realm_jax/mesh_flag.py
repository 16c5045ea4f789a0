"""`--config.mesh=data:2,fsdp:4` on the command line.

ml_collections' config flags cannot override list-valued fields ("Type <class 'list'> of field
config.mesh is not supported for overriding"), and config.mesh is a list of (name, size) pairs.
So the flag is taken out of argv before absl parses it and applied to the loaded config.
"""

from __future__ import annotations

from collections.abc import Sequence

FLAG = "--config.mesh"


def parse_mesh(text: str) -> list[tuple[str, int]]:
  """"data:2,fsdp:4" -> [("data", 2), ("fsdp", 4)]; a size of -1 means all remaining devices."""
  axes = []
  for part in text.split(","):
    name, sep, size = part.strip().partition(":")
    try:
      value = int(size)
    except ValueError:
      value = None
    if not sep or not name.strip() or value is None or (value < 1 and value != -1):
      raise ValueError(f"{FLAG}={text!r}: expected comma-separated name:size pairs with size a "
                       f"positive integer or -1, e.g. {FLAG}=data:2,fsdp:4 (bad part {part!r})")
    axes.append((name.strip(), value))
  return axes


def extract_mesh_flag(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, int]] | None]:
  """argv without --config.mesh (=X or X as the next word), and the parsed mesh (last wins)."""
  rest, mesh = [], None
  args = list(argv)
  i = 0
  while i < len(args):
    arg = args[i]
    if arg.startswith(FLAG + "="):
      mesh = parse_mesh(arg[len(FLAG) + 1:])
    elif arg == FLAG:
      if i + 1 >= len(args):
        raise ValueError(f"{FLAG} needs a value, e.g. {FLAG}=data:2,fsdp:4")
      mesh = parse_mesh(args[i + 1])
      i += 1
    else:
      rest.append(arg)
    i += 1
  return rest, mesh
