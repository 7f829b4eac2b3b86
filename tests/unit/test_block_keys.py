import os
import subprocess
import sys

import pytest

from dualpath.kv.index import longest_prefix
from dualpath.kv.keys import BlockKeyer, KeyNamespace

NS = KeyNamespace("model-abc", "mha:L2:H1:D4:Z0:X0:float32", 4)


def test_keys_cover_only_full_blocks_and_are_chained():
    keyer = BlockKeyer(NS)
    toks = list(range(10))
    keys = keyer.keys(toks)
    assert len(keys) == 2
    # chaining: the second block's key depends on the first block's tokens
    other = keyer.keys([99, 1, 2, 3] + toks[4:])
    assert other[1] != keys[1] and other[0] != keys[0]
    # continuing a chain from a parent gives the same keys as hashing the whole sequence
    assert keyer.keys(toks[4:8], parent=keys[0]) == keys[1:2]


def test_namespace_salts_keys():
    toks = list(range(8))
    a = BlockKeyer(NS).keys(toks)
    for ns in (
        KeyNamespace("model-xyz", NS.layout_fingerprint, 4),
        KeyNamespace(NS.model_fingerprint, "mha:L2:H1:D4:Z0:X0:bfloat16", 4),
    ):
        assert set(BlockKeyer(ns).keys(toks)).isdisjoint(a)


def test_longest_prefix_stops_at_first_miss():
    keys = BlockKeyer(NS).keys(list(range(16)))
    stored = {keys[0], keys[1], keys[3]}
    assert longest_prefix(keys, stored.__contains__) == 2
    assert longest_prefix(keys, lambda k: False) == 0


_SNIPPET = (
    "from dualpath.kv.keys import BlockKeyer, KeyNamespace;"
    "ns = KeyNamespace('model-abc', 'mha:L2:H1:D4:Z0:X0:float32', 4);"
    "print(','.join(k.hex for k in BlockKeyer(ns).keys(list(range(13)))))"
)


@pytest.mark.slow
def test_keys_identical_across_processes_and_hash_seeds():
    outs = set()
    for seed in ("0", "1", "12345", "random"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        res = subprocess.run([sys.executable, "-c", _SNIPPET], env=env, capture_output=True, text=True, check=True)
        outs.add(res.stdout.strip())
    assert len(outs) == 1
    here = ",".join(k.hex for k in BlockKeyer(NS).keys(list(range(13))))
    assert outs == {here}


def test_rejects_bad_tokens():
    with pytest.raises(ValueError):
        BlockKeyer(NS).keys([-1, 2, 3, 4])


def test_a_cache_salt_keys_a_prompt_apart_and_its_chain_continues():
    """vLLM's ``cache_salt``: the same tokens under another salt, or none, share no key; under the same salt
    every key is equal; a chain continued from a salted parent is the salted whole (decode's new blocks)."""
    keyer = BlockKeyer(NS)
    toks = list(range(12))
    plain, a, a2, b = (keyer.keys(toks, salt=s) for s in (None, "tenant-a", "tenant-a", "tenant-b"))
    assert a == a2 and len(a) == 3
    assert not ({*a} & {*plain}) and not ({*a} & {*b})
    assert keyer.keys(toks[4:8], parent=a[0]) == a[1:2]
    # a salt is no block: a salted first key never equals an unsalted chained key of any tokens
    assert keyer.keys(toks[:4], salt="") != keyer.keys(toks[:4])
    with pytest.raises(ValueError, match="salt"):
        keyer.keys(toks, parent=a[0], salt="tenant-a")
