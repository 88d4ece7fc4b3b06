"""Reading a local Hugging Face checkpoint directory: config.json and safetensors.

The weights are read with the `safetensors` package's numpy API (no PyTorch): one
`model.safetensors`, the shards named by `model.safetensors.index.json`, or every
`*.safetensors` file of the directory. A family (`gpt2`, `llama`) describes the
tensors it needs as a `Spec`; `read_params` gathers them into a pytree, the layers'
tensors stacked on a leading axis (the forward pass scans over layers: one compiled
layer, whatever the depth), and refuses a missing tensor, one of another shape, or
one the family would not use, each with one line naming it.
"""

import dataclasses
import glob
import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from robust_gate.checks import InputError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One tensor a family reads: its name in the checkpoint ("{i}" stands for the
  layer index) and its shape there. `transpose`: stored [out, in] (torch's Linear),
  used as [in, out] so every matmul reads x @ w."""

  name: str
  shape: tuple[int, ...]
  transpose: bool = False


@dataclasses.dataclass(frozen=True)
class Spec:
  """Every tensor of a family's checkpoint: `top` read once, `layers` once per layer
  and stacked; `ignored` matches tensors a checkpoint may hold that the forward pass
  does not need (buffers such as GPT-2's causal mask, a tied head's copy);
  `rename` maps the checkpoint's names onto these (GPT-2 files are written with and
  without a "transformer." prefix), and `saved_name` these onto the names
  transformers' `save_pretrained` writes (robust_gate.hf.export)."""

  top: Mapping[str, Tensor]
  layers: Mapping[str, Tensor]
  num_layers: int
  ignored: str = r"(?!)"  # matches nothing
  rename: Callable[[str], str] = lambda name: name
  saved_name: Callable[[str], str] = lambda name: name


def read_config(path: str) -> dict:
  """config.json of the checkpoint directory `path`, as a dict."""
  if not os.path.isdir(path):
    raise InputError(f"checkpoint directory {path} does not exist.")
  file = os.path.join(path, "config.json")
  if not os.path.isfile(file):
    raise InputError(f"checkpoint {path} has no config.json.")
  try:
    with open(file) as f:
      config = json.load(f)
  except (OSError, ValueError) as e:
    raise InputError(f"{file} cannot be read as JSON: {e}") from None
  if not isinstance(config, dict):
    raise InputError(f"{file} holds a {type(config).__name__}, not a JSON object.")
  return config


def config_value(config: Mapping, key: str, kind: type, path: str, default=None):
  """config[key] as `kind`, or `default` when absent or null (None: required)."""
  value = config.get(key)
  value = default if value is None else value
  if value is None:
    raise InputError(f"{path}/config.json has no {key!r}.")
  if kind is float and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
    raise InputError(f"{path}/config.json: {key}={value!r} must be {kind.__name__}.")
  return value


def tensor_files(path: str) -> dict[str, str]:
  """Each tensor's name → the safetensors file that holds it."""
  index = os.path.join(path, INDEX)
  if os.path.isfile(index):
    try:
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise InputError(f"{index} cannot be read ({type(e).__name__}: {e}).") from None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
      raise InputError(f"{index}: weight_map must map tensor names to file names.")
    for shard in sorted(set(weight_map.values())):
      if not os.path.isfile(os.path.join(path, shard)):
        raise InputError(f"shard {shard} named by {index} is missing.")
    return {name: os.path.join(path, shard) for name, shard in weight_map.items()}
  files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
  if not files:
    others = sorted(os.path.basename(f) for f in glob.glob(os.path.join(path, "*.bin")))
    hint = f" (it has {others}: save with safe_serialization=True)" if others else ""
    raise InputError(f"checkpoint {path} has no {SINGLE} or {INDEX}{hint}.")
  names: dict[str, str] = {}
  for file in files:
    for name in sorted(_open(file).keys()):
      if name in names:
        raise InputError(f"tensor {name} is in both {names[name]} and {file}.")
      names[name] = file
  return names


def _open(file: str):
  try:
    return safe_open(file, framework="numpy")
  except Exception as e:  # the Rust reader raises its own kinds for a damaged header
    raise InputError(f"{file} cannot be read as safetensors ({type(e).__name__}: {e}).") from None


def _get_tensor(handle, file: str, name: str) -> np.ndarray:
  """One tensor as numpy; bfloat16 (most released Llama weights), which numpy has no
  dtype of, is read from the file's bytes as JAX's (ml_dtypes') bfloat16."""
  try:
    return handle.get_tensor(name)
  except TypeError:  # safetensors' numpy API: "data type 'bfloat16' not understood"
    return _read_bfloat16(file, name)


def _read_bfloat16(file: str, name: str) -> np.ndarray:
  """A BF16 tensor from the safetensors layout: an 8-byte little-endian header size,
  the JSON header (dtype, shape, byte offsets after the header), the data."""
  with open(file, "rb") as f:
    size = int.from_bytes(f.read(8), "little")
    entry = json.loads(f.read(size))[name]
    if entry["dtype"] != "BF16":
      raise InputError(f"tensor {name} in {file} has dtype {entry['dtype']}, not readable.")
    begin, end = entry["data_offsets"]
    f.seek(8 + size + begin)
    raw = np.frombuffer(f.read(end - begin), np.uint16)
  return raw.view(jnp.bfloat16).reshape(entry["shape"])


def read_params(path: str, spec: Spec, dtype) -> dict:
  """The tensors `spec` names, cast to `dtype`: {key: array} for `spec.top` and
  {"layers": {key: [L, ...] array}} for `spec.layers`."""
  files = {spec.rename(name): (file, name) for name, file in tensor_files(path).items()}
  wanted = {t.name.format(i=i) for t in spec.layers.values() for i in range(spec.num_layers)}
  wanted |= {t.name for t in spec.top.values()}
  extra = sorted(n for n in files if n not in wanted and not re.fullmatch(spec.ignored, n))
  if extra:
    raise InputError(
      f"checkpoint {path} has tensors this architecture does not use, such as {extra[0]} "
      f"({len(extra)} in all): its config.json describes another model."
    )
  handles: dict[str, Any] = {}

  def read(name: str, tensor: Tensor) -> np.ndarray:
    if name not in files:
      raise InputError(f"checkpoint {path} has no tensor {name}.")
    file, original = files[name]
    if file not in handles:
      handles[file] = _open(file)
    value = _get_tensor(handles[file], file, original)
    if value.shape != tensor.shape:
      raise InputError(
        f"tensor {name} in {file} has shape {list(value.shape)}; config.json implies "
        f"{list(tensor.shape)}."
      )
    return (value.T if tensor.transpose else value).astype(dtype)

  params: dict = {key: read(t.name, t) for key, t in spec.top.items()}
  layers = {}
  for key, t in spec.layers.items():
    shape = t.shape[::-1] if t.transpose else t.shape
    stacked = np.empty((spec.num_layers, *shape), dtype)  # filled in place: one copy in memory
    for i in range(spec.num_layers):
      stacked[i] = read(t.name.format(i=i), t)
    layers[key] = stacked
  params["layers"] = layers
  return params
