"""robust_gate.checkpoint_job end to end on CPU: tiny GPT-2 and Llama checkpoints made
here without PyTorch (random parameters written by robust_gate.hf.export, a BPE
tokenizer trained on a few KB of text), two text domains, a gate, a student."""

import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

import robust_gate.hf as hf
from robust_gate import checkpoint_data, checkpoint_edits, checkpoint_job, config_files
from robust_gate import models as models_lib
from robust_gate.checks import InputError

ROOT = Path(__file__).parent.parent
WORDS = "the a law court judge shall may contract party any of to in by act section".split()  # noqa: SIM905


def _tokenizer(corpus: list[str], vocab: int) -> tokenizers.Tokenizer:
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab,
    special_tokens=["<unk>", "<s>", "</s>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tok.train_from_iterator(corpus, trainer)
  return tok


def _checkpoint(path: Path, config: dict, tok: tokenizers.Tokenizer, seed: int) -> str:
  """A checkpoint of random parameters: config.json and tokenizer.json written here,
  the tensors by hf.export from a Model drawn in the loader's own layout."""
  path.mkdir(parents=True)
  config = {**config, "vocab_size": tok.get_vocab_size(), "bos_token_id": 1, "eos_token_id": 2}
  (path / "config.json").write_text(json.dumps(config))
  tok.save(str(path / "tokenizer.json"))
  family = hf.FAMILIES[config["model_type"]]
  c = family.config_from_json(config, str(path))
  spec, rng = family.spec(c), np.random.default_rng(seed)

  def draw(t, layers=None):
    shape = (t.shape[::-1] if t.transpose else t.shape) if layers is None else None
    shape = shape or (layers, *(t.shape[::-1] if t.transpose else t.shape))
    if len(shape) - (layers is not None) == 1:  # norms' scales near 1, biases near 0
      return (1.0 if "weight" in t.name else 0.0) + 0.1 * rng.standard_normal(shape)
    return rng.standard_normal(shape) / np.sqrt(shape[-2])

  params = {k: draw(t) for k, t in spec.top.items()}
  params["layers"] = {k: draw(t, c.num_layers) for k, t in spec.layers.items()}
  params = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
  tokenizer = hf.tokenizer.load(str(path), config)
  hf.export.save(hf.Model(params, config["model_type"], c, tokenizer, str(path)), str(path))
  return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """Two domains of text (Python sources; sentences of legal words), a GPT-2 and a
  Llama sharing a tokenizer, one more Llama with a tokenizer of its own."""
  root = tmp_path_factory.mktemp("ckpt")
  stdlib = Path(os.__file__).parent
  code = [(stdlib / n).read_text() for n in ("textwrap.py", "heapq.py", "bisect.py")]
  rng = np.random.default_rng(0)
  prose = [" ".join(rng.choice(WORDS, 400)) + ".\n" for _ in range(6)]
  for name, texts in (("code", code), ("law", prose)):
    (root / name).mkdir()
    for i, text in enumerate(texts):
      (root / name / f"{i}.txt").write_text(text)
  tok = _tokenizer(code + prose, 320)
  small = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=64,
  )
  gpt2 = dict(model_type="gpt2", n_positions=64, n_embd=16, n_layer=1, n_head=2)
  return {
    "root": root,
    "code": _checkpoint(root / "ckpt_code", gpt2, tok, seed=1),
    "law": _checkpoint(root / "ckpt_law", dict(model_type="llama", **small), tok, seed=2),
    "other": _checkpoint(
      root / "ckpt_other", dict(model_type="llama", **small), _tokenizer(prose, 300), 3
    ),
  }


def _config(setup, experts=("code", "law")):
  c = config_files.load(str(ROOT / "launch/configs/checkpoints_example.py"))
  with c.unlocked():
    c.experts = {n: setup[n] for n in experts}
    c.data.files = {n: [str(setup["root"] / n / "*.txt")] for n in experts}
  c.data.max_len = 32
  c.gate.steps, c.gate.per_domain, c.checkpoint_every = 20, 8, 10
  c.distill.steps, c.distill.per_domain, c.distill.lr = 6, 4, 3e-3
  return c


@pytest.fixture(scope="module")
def finished(setup, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("job"))
  lines: list[str] = []
  out = checkpoint_edits.run(
    _config(setup), workdir, checkpoint_edits.Edit({}, {}, ()), lines.append
  )
  return workdir, out, lines


def test_job_writes_results_for_every_method_and_a_loadable_student(finished):
  workdir, out, _ = finished
  results = json.loads(Path(workdir, "results.json").read_text())
  methods = {"robust_gate", "erm_gate", "best_response", "uniform_mixture", "student"}
  assert methods | {"expert:code", "expert:law"} == set(results["worst_case"])
  assert all(np.isfinite(v) for v in results["worst_case"].values())
  cert = results["certificate"]
  assert cert["lower"][0] <= cert["upper"][0] + 1e-6
  assert cert["upper"][0] == pytest.approx(results["worst_case"]["robust_gate"])
  # The student: the family and shape of the expert of the largest λ̄, moved by distillation.
  lam = results["lambda_bar"]
  init = max(lam, key=lam.get)
  assert results["student"]["init_from"] == init
  assert results["student"]["weights"] == results["provenance"]["config"]["distill"]["weights"]
  exported = hf.load(str(Path(workdir, checkpoint_job.STUDENT_DIR)))
  start = hf.load(out.results["experts"][init])
  assert exported.family == start.family and exported.config == start.config
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), exported.params, start.params)
  assert max(jax.tree.leaves(moved)) > 1e-4
  same = jax.tree.map(lambda a, b: bool(np.all(a == b)), exported.params, out.student.params)
  assert all(jax.tree.leaves(same))  # the export is the student, bit for bit


def test_job_resumes_without_training_again(finished, setup):
  workdir, out, _ = finished
  lines: list[str] = []
  again = checkpoint_job.run(_config(setup), workdir, lines.append)
  assert not any(": step " in line for line in lines)  # every model restored
  assert again.results["worst_case"] == out.results["worst_case"]


def test_adding_an_expert_warm_starts_its_gate(finished, setup):
  workdir, out, _ = finished
  base = checkpoint_edits.load_gate(workdir)
  assert base is not None and base[0] == out.results["domains"]
  names, c = base[0], _config(setup)
  fresh = lambda m: models_lib.init_gate(
    models_lib.GateConfig(m, 320, c.data.max_len, c.gate.hidden, 0, c.gate.pos_embed),
    jax.random.PRNGKey(5),
  )
  # Removing an expert drops its row and column; adding it back puts zeros there, and
  # every other weight is where it was (position features after the experts' rows).
  fewer = checkpoint_edits.remap_gate(base[1], names, names[1:], fresh(1))
  back = checkpoint_edits.remap_gate(fewer, names[1:], names, fresh(2))
  old, new = base[1]["params"], back["params"]
  np.testing.assert_array_equal(new["Dense_0"]["kernel"][1:], old["Dense_0"]["kernel"][1:])
  assert np.all(new["Dense_0"]["kernel"][0] == 0) and np.all(new["Dense_1"]["kernel"][:, 0] == 0)
  np.testing.assert_array_equal(new["Dense_1"]["kernel"][:, 1], old["Dense_1"]["kernel"][:, 1])
  np.testing.assert_array_equal(new["Embed_0"]["embedding"], old["Embed_0"]["embedding"])


def test_edits_change_the_expert_list(setup):
  c = _config(setup)
  edit = checkpoint_edits.Edit.parse(["other=/x"], ["other=/a/*.txt,/b"], ["law"])
  edited = checkpoint_edits.edited_config(c, edit)
  assert dict(edited.experts) == {"code": setup["code"], "other": "/x"}
  assert list(edited.data.files["other"]) == ["/a/*.txt", "/b"]
  assert edit.name() == "add_other+remove_law"
  with pytest.raises(InputError, match="already has"):
    checkpoint_edits.edited_config(c, checkpoint_edits.Edit({"law": "/x"}, {}, ()))
  with pytest.raises(InputError, match="add_data"):
    checkpoint_edits.edited_config(c, checkpoint_edits.Edit({"new": "/x"}, {}, ()))


def test_mismatched_tokenizers_are_refused(setup, tmp_path):
  c = _config(setup)
  with c.unlocked():
    c.experts = {"code": setup["code"], "other": setup["other"]}
    c.data.files = {n: [str(setup["root"] / "law" / "*.txt")] for n in ("code", "other")}
  with pytest.raises(InputError, match="different tokenizers"):
    checkpoint_job.run(c, str(tmp_path))


def test_splits_are_deterministic_and_named_errors(setup):
  spec = checkpoint_data.TextData({"law": [str(setup["root"] / "law")]}, 32, 0.2, 0.2, "chunk")
  tok = hf.load(setup["law"]).tokenizer
  a = checkpoint_data.load_splits(spec, ["law"], tok, tok.size)
  b = checkpoint_data.load_splits(spec, ["law"], tok, tok.size)
  np.testing.assert_array_equal(a.test.inputs_NxT, b.test.inputs_NxT)
  total = sum(len(s.domain_N) for s in (a.train, a.validation, a.test))
  assert 0 < len(a.test.domain_N) < total / 2
  with pytest.raises(InputError, match="no file matches"):
    checkpoint_data.load_splits(
      checkpoint_data.TextData({"law": ["/nonexistent/*.txt"]}, 32, 0.2, 0.2),
      ["law"],
      tok,
      tok.size,
    )
