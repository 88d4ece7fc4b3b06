"""robust_gate.hf.export: a Model written back as a checkpoint, read back bit for bit,
and, with modified weights, scored as transformers scores it (tests/fixtures/hf_export:
transformers' log-probs of such exports, written by launch/check_export.py --write)."""

import importlib.util
import json
import struct
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

import robust_gate.hf as hf
from robust_gate.hf import checkpoint

ROOT = Path(__file__).parent.parent
FIXTURES = Path(__file__).parent / "fixtures" / "hf"
EXPORTED = Path(__file__).parent / "fixtures" / "hf_export"
NAMES = ("gpt2", "llama_tied", "llama_untied")
TOLERANCE = 1e-4  # float32 against transformers' float32, per token
PERTURB_SEED = 1  # the seed the fixtures were written with (launch/check_export.py)


def _check_export_module():
  spec = importlib.util.spec_from_file_location("check_export", ROOT / "launch/check_export.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _same_params(a: hf.Model, b: hf.Model) -> bool:
  same = jax.tree.map(lambda x, y: x.dtype == y.dtype and bool(jnp.all(x == y)), a.params, b.params)
  return jax.tree.structure(a.params) == jax.tree.structure(b.params) and all(jax.tree.leaves(same))


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_is_bitwise(tmp_path, name):
  model = hf.load(str(FIXTURES / name))
  out = hf.export.save(model, str(tmp_path / "out"))
  again = hf.load(out)
  assert _same_params(model, again)
  assert again.config == model.config and again.family == model.family
  assert hf.fingerprint(again) == hf.fingerprint(model)
  assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (
    FIXTURES / name / "tokenizer.json"
  ).read_bytes()
  config = json.loads((tmp_path / "out" / "config.json").read_text())
  assert config["architectures"] == [hf.export.ARCHITECTURES[model.family]]
  with safe_open(str(tmp_path / "out" / checkpoint.SINGLE), framework="numpy") as f:
    names, metadata = set(f.keys()), f.metadata()
  assert metadata == {"format": "pt"}  # transformers refuses safetensors without it
  tied = model.family == "gpt2" or model.config.tied
  assert any("lm_head" in n for n in names) != tied  # a tied head is not written
  if model.family == "gpt2":
    assert all(n.startswith("transformer.") for n in names)  # GPT2LMHeadModel's names


def test_exporting_again_replaces_the_directory_whole(tmp_path):
  gpt2, llama = (hf.load(str(FIXTURES / n)) for n in ("gpt2", "llama_untied"))
  hf.export.save(gpt2, str(tmp_path / "out"))
  (tmp_path / "out" / "stale.txt").write_text("from the earlier export")
  hf.export.save(llama, str(tmp_path / "out"))
  assert not (tmp_path / "out" / "stale.txt").exists()
  assert _same_params(hf.load(str(tmp_path / "out")), llama)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging left behind


@pytest.mark.parametrize("name", NAMES)
def test_modified_weights_score_as_transformers_scores_them(tmp_path, name):
  tool = _check_export_module()
  model = hf.load(str(FIXTURES / name))
  modified = tool.perturbed(model, PERTURB_SEED)
  out = hf.export.save(modified, str(tmp_path / name))
  assert _same_params(hf.load(out), modified)
  ref = np.load(EXPORTED / f"{name}.npz")
  got_BxT = tool.robust_gate_logprobs(out, ref["ids_BxT"])
  error = np.abs(got_BxT - ref["logp_BxT"]).max()
  print(f"{name}, modified and exported: max |Δ log-prob| against transformers {error:.2e}")
  assert error < TOLERANCE
  # The fixture is of the modified weights: the original's log-probs are far from it.
  original_BxT = tool.robust_gate_logprobs(str(FIXTURES / name), ref["ids_BxT"])
  assert np.abs(original_BxT - ref["logp_BxT"]).max() > 100 * TOLERANCE


def _save_bfloat16(tensors: dict[str, np.ndarray], path: Path) -> None:
  """A BF16 safetensors file, written from the format's definition (numpy cannot)."""
  header, offset, blobs = {"__metadata__": {"format": "pt"}}, 0, []
  for name, value in tensors.items():
    blob = np.ascontiguousarray(value.astype(jnp.bfloat16)).view(np.uint16).tobytes()
    end = offset + len(blob)
    header[name] = {"dtype": "BF16", "shape": list(value.shape), "data_offsets": [offset, end]}
    offset += len(blob)
    blobs.append(blob)
  encoded = json.dumps(header).encode()
  encoded += b" " * (-len(encoded) % 8)
  path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs))


def test_bfloat16_checkpoints_load_and_round_trip(tmp_path):
  model = hf.load(str(FIXTURES / "llama_tied"), dtype="bfloat16")
  out = tmp_path / "bf16"
  hf.export.save(model, str(out))
  assert _same_params(hf.load(str(out), dtype="bfloat16"), model)  # via float32, exactly
  # A checkpoint stored in bfloat16 (as most released Llama weights are) reads too.
  _save_bfloat16(hf.export.tensors(model), out / checkpoint.SINGLE)
  assert _same_params(hf.load(str(out), dtype="bfloat16"), model)
  as_float32 = hf.load(str(out))  # bfloat16 on disk, float32 in memory: exact
  assert as_float32.params["embed"].dtype == jnp.float32
  np.testing.assert_array_equal(
    as_float32.params["embed"], model.params["embed"].astype(jnp.float32)
  )
