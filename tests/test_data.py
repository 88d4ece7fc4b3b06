import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from robust_gate import data
from robust_gate.checks import InputError


def _toy():
  seqs = [np.array([3, 4]), np.array([5]), np.array([1, 2, 3]), np.array([7, 7, 7, 7])]
  return data.encode(seqs, [0, 1, 1, 0], ["a", "b"], vocab_size=8, max_len=6)


def test_encode_layout():
  d = _toy()
  np.testing.assert_array_equal(d.inputs_NxT[0], [0, 3, 4, 0, 0, 0])
  np.testing.assert_array_equal(d.targets_NxT[0], [3, 4, 0, 0, 0, 0])
  np.testing.assert_array_equal(d.mask_NxT[0], [1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(d.counts(), [2, 2])
  assert d.fingerprint() == _toy().fingerprint()
  assert d.fingerprint() != d.subset([0, 1, 2]).fingerprint()


def test_truncation_keeps_the_context_full():
  d = data.encode([np.arange(1, 10)], [0], ["a"], vocab_size=16, max_len=4, truncate=True)
  np.testing.assert_array_equal(d.inputs_NxT[0], [0, 1, 2, 3])
  np.testing.assert_array_equal(d.targets_NxT[0], [1, 2, 3, 4])
  assert d.mask_NxT.all()


@pytest.mark.parametrize(
  "seqs, labels, domains, match",
  [
    ([np.array([1])], [0], [], "domain list is empty"),
    ([np.array([1]), np.array([2])], [0, 0], ["a", "b"], "domain 'b' has no examples"),
    ([np.array([1])], [2], ["a", "b"], "domain label 2, outside"),
    ([np.array([1])], [-1], ["a"], "outside"),
    ([np.array([], np.int32)], [0], ["a"], "is empty"),
    ([np.arange(1, 8)], [0], ["a"], "7 tokens; the context holds 5"),
    ([np.array([1, 9])], [0], ["a"], "token 9 outside the vocabulary"),
    ([np.array([0, 1])], [0], ["a"], "token 0 outside"),
    ([np.array([1])], [0, 0], ["a"], "1 sequences but 2 domain labels"),
  ],
)
def test_bad_data_is_a_clear_error(seqs, labels, domains, match):
  with pytest.raises(InputError, match=match):
    data.encode(seqs, labels, domains, vocab_size=8, max_len=6)


def test_text_encoding():
  np.testing.assert_array_equal(data.text_to_tokens("hé"), [104, 195, 169])
  with pytest.raises(InputError, match="not valid UTF-8"):
    data.text_to_tokens(b"\xff\xfe")
  with pytest.raises(InputError, match="NUL byte"):
    data.text_to_tokens("a\x00b")
  with pytest.raises(InputError, match="domain 'c', not in the domain list"):
    data.from_data_source(
      [{"text": "ab", "domain": "c"}],
      domains=["a", "b"],
      vocab_size=256,
      max_len=8,
      text_key="text",
    )
  with pytest.raises(InputError, match="split is empty"):
    data.from_data_source([], domains=["a"], vocab_size=256, max_len=8, text_key="text")


def test_stratified_batch_draws_every_domain():
  d = _toy()
  idx = jax.jit(lambda k: data.stratified_batch(k, data.domain_index(d), 50))(jax.random.PRNGKey(0))
  assert idx.shape == (2, 50)
  np.testing.assert_array_equal(d.domain_N[np.asarray(idx)], np.repeat([[0], [1]], 50, 1))
  assert set(np.asarray(idx[0]).tolist()) == {0, 3}


def test_catalog_dataset_by_name_with_mock_data():
  with tfds.testing.mock_data(num_examples=40):
    d = data.load_catalog(
      "ag_news_subset", "test", text_key="description", domain_key="label", max_len=32
    )
    source = tfds.builder("ag_news_subset").as_data_source("test")
    examples = [source[i] for i in range(len(source))]
  # The domain names are the label feature's ClassLabel names.
  assert d.domains == ("World", "Sports", "Business", "Sci/Tech")
  assert d.inputs_NxT.shape == (40, 32) and d.vocab_size == 256
  np.testing.assert_array_equal(d.domain_N, [e["label"] for e in examples])
  # UTF-8 bytes + EOS, cropped to the 32-token context (truncate=True by default).
  lengths = [min(len(data.text_to_tokens(e["description"])) + 1, 32) for e in examples]
  np.testing.assert_array_equal(d.mask_NxT.sum(axis=1), lengths)
  assert len(examples) == 40 and len(set(lengths)) > 1


class _Batched:
  """A random-access source that counts its single and batched reads."""

  def __init__(self, examples):
    self.examples, self.single, self.batched = examples, 0, []

  def __len__(self):
    return len(self.examples)

  def __getitem__(self, i):
    self.single += 1
    return self.examples[i]

  def __getitems__(self, keys):
    self.batched.append(list(keys))
    return [self.examples[k] for k in keys]


def test_sources_are_read_in_batches_with_the_same_examples(monkeypatch):
  monkeypatch.setattr(data, "_READ_CHUNK", 4)
  examples = [{"tokens": [3, i + 1], "domain": i % 2} for i in range(10)]
  kw = dict(domains=["a", "b"], vocab_size=16, max_len=4)
  one_by_one = data.from_data_source(list(examples), **kw)
  source = _Batched(examples)
  assert data.from_data_source(source, **kw).fingerprint() == one_by_one.fingerprint()
  assert source.single == 0 and source.batched == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]

  source = _Batched(examples)
  got = list(data.blocks(source, rows=6, **kw))
  assert source.single == 0 and source.batched == [[0, 1, 2, 3], [4, 5], [6, 7, 8, 9]]
  assert [len(b.domain_N) for b in got] == [6, 4]
  assert np.array_equal(np.concatenate([b.inputs_NxT for b in got]), one_by_one.inputs_NxT)
