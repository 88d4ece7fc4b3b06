import errno
import json
import os
import pathlib

import jax
import numpy as np
import pytest

from robust_gate import data, datasets
from robust_gate.checks import InputError


def test_wordfreq_builder_splits_are_disjoint(tmp_path):
  opts = dict(languages=("en", "fi"), examples_per_split=(60, 30, 30), wordlist_size=2000)
  splits = {s: data.load_local("wordfreq", s, str(tmp_path), 16, **opts) for s in datasets.SPLITS}
  words = {}
  for s, d in splits.items():
    assert d.domains == ("en", "fi") and d.vocab_size == 256
    np.testing.assert_array_equal(
      d.counts(), [opts["examples_per_split"][datasets.SPLITS.index(s)]] * 2
    )
    words[s] = {bytes(t[m][:-1].astype(np.uint8)) for t, m in zip(d.targets_NxT, d.mask_NxT)}
  assert not words["train"] & words["validation"]
  assert not words["train"] & words["test"]
  assert not words["validation"] & words["test"]
  # Built once: a second load reads the prepared files and gives the same data.
  again = data.load_local("wordfreq", "test", str(tmp_path), 16, **opts)
  assert again.fingerprint() == splits["test"].fingerprint()


def test_digits_builder(tmp_path):
  d = data.load_local("digits", "train", str(tmp_path), 66, groups=((0,), (1, 7)))
  assert d.domains == ("digits_0", "digits_17") and d.vocab_size == 18
  assert d.mask_NxT.sum(1).tolist() == [65] * len(d.domain_N)  # 64 pixels + EOS
  assert d.targets_NxT[:, :64].min() >= 1 and d.targets_NxT[:, :64].max() <= 17
  # 70% of each group, rounded: class 0 has 178 images, classes 1 and 7 have 182 + 179.
  assert d.counts().tolist() == [round(0.7 * 178), round(0.7 * (182 + 179))] == [125, 253]


def test_markov_entropy_is_exact(tmp_path):
  """The empirical NLL under the true chain converges to markov_entropy."""
  opts = dict(num_domains=2, num_states=4, seq_len=6, examples_per_split=(3000, 10, 10))
  d = data.load_local("markov", "train", str(tmp_path), 8, **opts)
  config = datasets.make_config("markov", **opts)
  initial, trans = datasets.markov_chains(config)
  H = datasets.markov_entropy(config)
  for k in range(2):
    x = d.targets_NxT[d.domain_N == k][:, :6] - 1
    nll = -np.log(initial[k][x[:, 0]]) - np.log(trans[k][x[:, :-1], x[:, 1:]]).sum(1)
    per_token = nll / 7  # 6 tokens + EOS (EOS has probability 1 given the length)
    assert abs(per_token.mean() - H[k]) < 4 * per_token.std() / np.sqrt(len(x))


def test_unknown_options_are_errors(tmp_path):
  with pytest.raises(ValueError, match="unknown wordfreq dataset options"):
    datasets.make_config("wordfreq", langs=("en",))
  with pytest.raises(InputError, match="unknown local dataset"):
    datasets.make_config("imagenet")


@pytest.mark.parametrize(
  "name, opts, match",
  [
    ("markov", {"num_domains": 0}, "num_domains=0 must be positive"),
    ("markov", {"concentration": float("nan")}, "concentration=nan must be finite and > 0"),
    ("wordfreq", {"languages": ()}, "must be a non-empty list of language codes"),
    ("wordfreq", {"languages": "en"}, "languages='en' must be a non-empty list of language"),
    ("digits", {"groups": ((0, 1), (1, 2))}, "disjoint"),
    ("digits", {"groups": ((0, 11),)}, "classes 0..9"),
    ("markov", {"seq_len": "long"}, "seq_len='long' must be an int"),
  ],
)
def test_bad_options_are_errors(name, opts, match):
  with pytest.raises(InputError, match=match):
    datasets.make_config(name, **opts)


TINY_MARKOV = dict(num_domains=2, num_states=3, seq_len=4, examples_per_split=(20, 10, 10))


def _record_file(prepared):
  (record,) = pathlib.Path(prepared).glob("*-train.array_record-*")
  return record


def _flip_record_bytes(prepared):
  """Bytes flipped inside the train split's record file (its chunk hashes fail)."""
  record = _record_file(prepared)
  raw = bytearray(record.read_bytes())
  raw[100:140] = bytes(b ^ 0xFF for b in raw[100:140])
  record.write_bytes(bytes(raw))


def _cut_record(prepared):
  record = _record_file(prepared)
  record.write_bytes(record.read_bytes()[:1000])


def _delete_record(prepared):
  _record_file(prepared).unlink()


def _break_info(prepared):
  (pathlib.Path(prepared) / "dataset_info.json").write_text('{"name": ')


def _garble_info(prepared):
  (pathlib.Path(prepared) / "dataset_info.json").write_bytes(b"\xff\xfe\x00garbage")


def _delete_info(prepared):
  (pathlib.Path(prepared) / "dataset_info.json").unlink()


def _overcount_info(prepared):
  """dataset_info.json counts more train examples than its record file holds."""
  path = pathlib.Path(prepared) / "dataset_info.json"
  info = json.loads(path.read_text())
  (train,) = [s for s in info["splits"] if s["name"] == "train"]
  train["shardLengths"] = [str(int(train["shardLengths"][0]) + 5)]
  path.write_text(json.dumps(info))


@pytest.mark.parametrize(
  "damage, evidence",
  [
    (_flip_record_bytes, "RuntimeError: Corrupted Riegeli/records file"),
    (_cut_record, "RuntimeError: ArrayRecord file should be at least"),
    (_delete_record, "No such file or directory"),
    (_overcount_info, "out of bound"),
    (_break_info, "dataset_info.json does not parse"),
    (_garble_info, "dataset_info.json does not parse"),
    (_delete_info, "dataset_info.json is missing"),
  ],
)
def test_a_damaged_prepared_dataset_is_announced_and_prepared_again(tmp_path, damage, evidence):
  load = lambda log: data.load_local("markov", "train", str(tmp_path), 8, log=log, **TINY_MARKOV)
  fresh = load(pytest.fail)  # prepared now: nothing to announce
  prepared = datasets.prepared_dir("markov", str(tmp_path), **TINY_MARKOV)
  damage(prepared)
  lines = []
  again = load(lines.append)
  assert len(lines) == 1, lines
  assert lines[0].startswith(f"markov: the prepared dataset {prepared} is damaged (")
  assert evidence in lines[0] and lines[0].endswith("); preparing it again.")
  assert again.fingerprint() == fresh.fingerprint()
  assert load(pytest.fail).fingerprint() == fresh.fingerprint()  # whole again: read as is


def _files(directory):
  return {p: p.read_bytes() for p in sorted(pathlib.Path(directory).rglob("*")) if p.is_file()}


def _prepared(tmp_path):
  """(load(log), the data as prepared, its directory)."""
  load = lambda log: data.load_local("markov", "train", str(tmp_path), 8, log=log, **TINY_MARKOV)
  return load, load(pytest.fail), datasets.prepared_dir("markov", str(tmp_path), **TINY_MARKOV)


@pytest.mark.parametrize(
  "error",
  [
    OSError(errno.EIO, "Input/output error"),
    OSError(errno.ESTALE, "Stale file handle"),
    RuntimeError("read failed: errno=5"),  # array_record's form of an I/O error
  ],
  ids=["EIO", "ESTALE", "array_record-EIO"],
)
def test_a_read_error_without_damage_deletes_nothing(tmp_path, monkeypatch, error):
  """A filesystem error, or another job changing the files, is one line naming the
  directory; the files stay for the other readers, and read once the error is gone."""
  import tensorflow_datasets as tfds

  load, fresh, prepared = _prepared(tmp_path)
  before = _files(tmp_path)

  def failing(self, split):
    raise error

  with monkeypatch.context() as patch:
    patch.setattr(tfds.core.DatasetBuilder, "as_data_source", failing)
    with pytest.raises(InputError) as info:
      load(pytest.fail)
  message = str(info.value)
  assert "\n" not in message
  assert message.startswith(
    f"markov: cannot read the prepared dataset {prepared} ({type(error).__name__}: "
  )
  assert "left as it is (no sign of damage)" in message and f"delete {prepared} to" in message
  assert _files(tmp_path) == before
  assert load(pytest.fail).fingerprint() == fresh.fingerprint()


def test_a_bug_while_reading_keeps_its_traceback_and_deletes_nothing(tmp_path, monkeypatch):
  import tensorflow_datasets as tfds

  load, _, _ = _prepared(tmp_path)
  before = _files(tmp_path)

  def buggy(self, split):
    raise TypeError("a bug")

  monkeypatch.setattr(tfds.core.DatasetBuilder, "as_data_source", buggy)
  with pytest.raises(TypeError, match="a bug"):
    load(pytest.fail)
  assert _files(tmp_path) == before


def test_only_process_0_prepares_a_damaged_dataset_again(tmp_path, monkeypatch):
  """Another process that finds damage after process 0 read the files says so in one
  line and deletes nothing: the others may be reading them."""
  load, fresh, prepared = _prepared(tmp_path)
  _flip_record_bytes(prepared)
  damaged = _files(tmp_path)
  with monkeypatch.context() as patch:
    patch.setattr(jax, "process_index", lambda *args: 1)
    with pytest.raises(InputError) as info:
      load(pytest.fail)
  message = str(info.value)
  assert "\n" not in message
  assert f"cannot read the prepared dataset {prepared} (RuntimeError: Corrupted Riegeli" in message
  assert "left as it is (process 0 read it; only it rebuilds)" in message
  assert _files(tmp_path) == damaged
  lines = []  # process 0 prepares it again
  assert load(lines.append).fingerprint() == fresh.fingerprint() and len(lines) == 1


def test_a_damaged_catalog_dataset_names_the_directory_to_delete(tmp_path, monkeypatch):
  """A prepared TFDS dataset loaded by name is not rebuilt (it may need a download):
  one line says which directory to delete."""
  import tensorflow_datasets as tfds

  builder = datasets.build("markov", str(tmp_path), **TINY_MARKOV)
  _flip_record_bytes(builder.data_dir)
  monkeypatch.setattr(tfds, "builder", lambda name, data_dir: builder)
  with pytest.raises(InputError) as info:
    data.load_catalog(
      "some_catalog_dataset", "train", text_key="tokens", domain_key="domain", max_len=8
    )
  message = str(info.value)
  assert "\n" not in message
  assert f"TFDS dataset 'some_catalog_dataset' in {builder.data_dir} cannot be read (" in message
  assert "Corrupted Riegeli/records file" in message and "delete that directory" in message


def test_leftovers_of_a_killed_preparation_are_removed(tmp_path):
  prepared = datasets.prepared_dir("markov", str(tmp_path), **TINY_MARKOV)
  leftover = os.path.join(os.path.dirname(prepared), "incomplete.AB12CD_1.0.0")
  os.makedirs(leftover)
  pathlib.Path(leftover, "robust_gate_markov-train.array_record-00000-of-00001").touch()
  lines = []
  datasets.build("markov", str(tmp_path), log=lines.append, **TINY_MARKOV)
  assert lines == [
    f"removing {leftover}, left by a markov dataset preparation that did not finish."
  ]
  assert os.listdir(os.path.dirname(prepared)) == ["1.0.0"]


def test_a_language_without_words_is_a_clear_error_not_a_preparation_traceback(tmp_path):
  with pytest.raises(
    InputError, match=r"wordfreq language 'en' has no word .* raise wordlist_size"
  ):
    datasets.build(
      "wordfreq", str(tmp_path), languages=("en",), wordlist_size=5, examples_per_split=(5, 5, 5)
    )
