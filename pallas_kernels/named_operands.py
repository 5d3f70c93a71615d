"""``pallas_call`` with named operands: inputs and outputs as dicts, in-place outputs by name.

``pl.pallas_call(kernel, out_shape={...})({...})`` hands the kernel a dict of input refs and a
dict of output refs under the same names, so an optional operand is simply absent, never a
placeholder array. ``input_output_aliases`` still wants flat indices; ``alias_indices`` derives
them from names.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax


def _flat_names(tree: Mapping[str, Any]) -> list[str]:
  """The names of ``tree``'s entries in the order ``jax.tree`` flattens them."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(dict(tree))
  return [path[0].key for path, _ in leaves]


def alias_indices(inputs: Mapping[str, Any], outputs: Mapping[str, Any], aliases: Mapping[str, str]
                  ) -> dict[int, int]:
  """``input_output_aliases`` of ``pallas_call(kernel, out_shape=outputs)(inputs)``.

  Args:
    inputs, outputs: one array (or ``jax.ShapeDtypeStruct``) per name.
    aliases: input name -> name of the output that is written into that input's buffer.
  """
  in_names, out_names = _flat_names(inputs), _flat_names(outputs)
  unknown = [f"{i}->{o}" for i, o in aliases.items() if i not in in_names or o not in out_names]
  if unknown:
    raise ValueError(f"aliases {unknown} name no input or output (inputs {in_names}, outputs {out_names})")
  return {in_names.index(i): out_names.index(o) for i, o in aliases.items()}
