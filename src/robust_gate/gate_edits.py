"""A fitted causal gate as a gate over another list of experts: the warm start of an
edited job (robust_gate.checkpoint_edits) and of the extend experiment.

The gate's first layer reads [relative prefix log-likelihoods (one per expert),
position embedding, token embedding] features and its last layer writes one
correction per expert (robust_gate.models.CausalGate), so the expert rows of the
first kernel and the expert columns of the last are moved; the position and token
rows stay where they are, after the expert rows. An added expert's weights start at 0.
"""

import jax
import numpy as np


def remap_gate(old_params, old_names, new_names, fresh_params):
  """Warm start: the gate over `old_names` as a gate over `new_names` (module docstring).

  The first layer reads [relative prefix log-likelihoods (M), position (, token)]
  features, the last writes M corrections: their expert rows and columns are moved.
  """
  keep = [(list(old_names).index(n), j) for j, n in enumerate(new_names) if n in old_names]
  src, dst = [i for i, _ in keep], [j for _, j in keep]
  M_old, M_new = len(old_names), len(new_names)
  old = jax.tree.map(np.asarray, old_params)["params"]
  out = jax.tree.map(np.array, fresh_params)  # copies, written below
  new = out["params"]
  new["Embed_0"], new["posterior_scale"] = old["Embed_0"], old["posterior_scale"]
  if "Embed_1" in old:
    new["Embed_1"] = old["Embed_1"]
  k0 = np.zeros_like(new["Dense_0"]["kernel"])
  k0[dst], k0[M_new:] = old["Dense_0"]["kernel"][src], old["Dense_0"]["kernel"][M_old:]
  new["Dense_0"] = {"kernel": k0, "bias": old["Dense_0"]["bias"]}
  k1, b1 = np.zeros_like(new["Dense_1"]["kernel"]), np.zeros_like(new["Dense_1"]["bias"])
  k1[:, dst], b1[dst] = old["Dense_1"]["kernel"][:, src], old["Dense_1"]["bias"][src]
  new["Dense_1"] = {"kernel": k1, "bias": b1}
  return out
