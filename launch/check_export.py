"""Checks an exported checkpoint (robust_gate.hf.export) against transformers itself.

Loads the directory with transformers' AutoModelForCausalLM and AutoTokenizer,
computes per-token log-probs of random id rows ([BOS, tokens, EOS]; or --text),
and compares them with robust_gate's own for the same directory; prints the largest
absolute difference and exits 1 when it exceeds --tolerance (1e-4: float32 against
float32). Runs in an environment with PyTorch and transformers (the project needs
neither); robust_gate's side runs in-process when that environment also has
robust_gate, else in a subprocess of --robust_gate_python (default: the repository's
.venv):

    /tmp/hfvenv/bin/python launch/check_export.py --ckpt=/tmp/rg_ckpt/student_hf

With --write=FILE.npz it also saves the ids and transformers' log-probs
(tests/fixtures/hf_export/ holds such files). Two modes run in robust_gate's
environment: --robust_gate_side (robust_gate's log-probs of the ids in --ids, the
subprocess above) and --perturb_from=SRC (exports SRC's model with every parameter
perturbed by --perturb_seed into --ckpt: the modified checkpoints the tests check).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-4


def perturbed(model, seed: int, scale: float = 0.05):
  """`model` with Gaussian noise of sd `scale`·(the tensor's sd) added to every parameter
  (numpy's generator: the same numbers on every machine)."""
  import dataclasses  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  leaves, tree = jax.tree.flatten(model.params)
  noisy = []
  for leaf in leaves:
    a = np.asarray(leaf, np.float32)
    noise = rng.standard_normal(a.shape).astype(np.float32)
    noisy.append(a + np.float32(scale * (a.std() + 1e-3)) * noise)
  return dataclasses.replace(model, params=jax.tree.unflatten(tree, noisy))


def random_ids(ckpt: Path, rows: int, length: int, seed: int) -> np.ndarray:
  """[rows, length] checkpoint ids: BOS, random tokens other than EOS, EOS."""
  config = json.loads((ckpt / "config.json").read_text())
  first = lambda v: v[0] if isinstance(v, list) else v
  eos = first(config["eos_token_id"])
  bos = first(config.get("bos_token_id")) if config.get("bos_token_id") is not None else eos
  import tokenizers  # pylint: disable=g-import-not-at-top

  size = tokenizers.Tokenizer.from_file(str(ckpt / "tokenizer.json")).get_vocab_size(True)
  rng = np.random.default_rng(seed)
  body = rng.choice([i for i in range(size) if i != eos], size=(rows, length - 2))
  column = lambda v: np.full((rows, 1), v)
  return np.concatenate([column(bos), body, column(eos)], axis=1).astype(np.int64)


def robust_gate_logprobs(ckpt: str, ids_BxT: np.ndarray) -> np.ndarray:
  """robust_gate's float32 log p(ids[t + 1] | ids[≤ t]), [B, T − 1], in checkpoint ids."""
  import robust_gate.hf as hf  # pylint: disable=g-import-not-at-top

  model = hf.load(ckpt)
  eos = model.tokenizer.eos_id
  inputs = hf.tokenizer.swap_eos(ids_BxT[:, :-1], eos)
  inputs[:, 0] = 0  # the data's input 0 is the checkpoint's BOS
  targets = hf.tokenizer.swap_eos(ids_BxT[:, 1:], eos)
  return np.asarray(hf.token_logprobs(model, inputs, targets))


def _robust_gate_side(ckpt: str, ids_BxT: np.ndarray, python: str) -> np.ndarray:
  try:
    import robust_gate.hf  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    with tempfile.TemporaryDirectory() as tmp:
      ids_file, out_file = os.path.join(tmp, "ids.npy"), os.path.join(tmp, "logp.npy")
      np.save(ids_file, ids_BxT)
      command = [python, __file__, "--robust_gate_side", f"--ckpt={ckpt}", f"--ids={ids_file}"]
      subprocess.run([*command, f"--out={out_file}"], check=True, cwd=ROOT)
      return np.load(out_file)
  return robust_gate_logprobs(ckpt, ids_BxT)


def transformers_logprobs(ckpt: str, ids_BxT: np.ndarray) -> np.ndarray:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
  with torch.no_grad():
    logits = model(torch.from_numpy(ids_BxT[:, :-1])).logits.float()
  logp = torch.log_softmax(logits, dim=-1)
  return logp.gather(-1, torch.from_numpy(ids_BxT[:, 1:, None]))[..., 0].numpy()


def check_tokenizer(ckpt: str, text: str) -> list[int]:
  """AutoTokenizer's ids of `text` equal tokenizer.json's (raises otherwise)."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  theirs = transformers.AutoTokenizer.from_pretrained(ckpt)(text, add_special_tokens=False)
  ours = tokenizers.Tokenizer.from_file(os.path.join(ckpt, "tokenizer.json"))
  ids = ours.encode(text, add_special_tokens=False).ids
  if list(theirs["input_ids"]) != ids:
    raise SystemExit(f"tokenizer mismatch on {text!r}: {theirs['input_ids']} vs {ids}")
  return ids


def main(argv: list[str]) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--ckpt", required=True, help="the exported checkpoint directory")
  p.add_argument("--rows", type=int, default=3)
  p.add_argument("--length", type=int, default=24, help="ids per row, BOS and EOS included")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--text", default="def f(x):\n    return x + 1  # The quick brown fox.\n")
  p.add_argument("--tolerance", type=float, default=TOLERANCE)
  p.add_argument("--write", help="also save ids_BxT and transformers' logp_BxT here (.npz)")
  p.add_argument("--robust_gate_python", default=str(ROOT / ".venv" / "bin" / "python"))
  p.add_argument("--robust_gate_side", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--ids", help=argparse.SUPPRESS)
  p.add_argument("--out", help=argparse.SUPPRESS)
  p.add_argument("--perturb_from", help="export this checkpoint's model, perturbed, to --ckpt")
  p.add_argument("--perturb_seed", type=int, default=0)
  a = p.parse_args(argv)
  if a.robust_gate_side:
    np.save(a.out, robust_gate_logprobs(a.ckpt, np.load(a.ids)))
    return 0
  if a.perturb_from:
    import robust_gate.hf as hf  # pylint: disable=g-import-not-at-top

    hf.export.save(perturbed(hf.load(a.perturb_from), a.perturb_seed), a.ckpt)
    print(f"wrote {a.ckpt}")
    return 0
  ids_BxT = random_ids(Path(a.ckpt), a.rows, a.length, a.seed)
  text_ids = check_tokenizer(a.ckpt, a.text)
  theirs = transformers_logprobs(a.ckpt, ids_BxT)
  ours = _robust_gate_side(a.ckpt, ids_BxT, a.robust_gate_python)
  error = float(np.abs(theirs - ours).max())
  print(
    f"{a.ckpt}: {ids_BxT.shape[0]}x{ids_BxT.shape[1] - 1} tokens, log-prob sd "
    f"{theirs.std():.3f}; tokenizer: AutoTokenizer = tokenizer.json on {len(text_ids)} ids; "
    f"max |Δ log-prob| robust_gate vs transformers {error:.2e} (tolerance {a.tolerance:g})"
  )
  if a.write:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top

    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    np.savez(a.write, ids_BxT=ids_BxT, logp_BxT=theirs, versions=np.array(versions))
  return 0 if error <= a.tolerance else 1


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
