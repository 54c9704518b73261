import numpy as np
import torch

from kmoe import hashing as H


def test_canonical_json_is_order_independent():
    assert H.canonical_json({"b": 1, "a": [1, "가"]}) == H.canonical_json({"a": [1, "가"], "b": 1})


def test_tensor_digest_covers_dtype_shape_and_bytes():
    t = torch.arange(6, dtype=torch.float32)
    assert H.tensor_digest(t) == H.tensor_digest(t.clone())
    assert H.tensor_digest(t) != H.tensor_digest(t.view(2, 3))
    assert H.tensor_digest(t) != H.tensor_digest(t.double())
    assert H.tensor_digest(t) == H.tensor_digest(np.arange(6, dtype=np.float32))
    assert H.tensor_digest(t.bfloat16()) != H.tensor_digest(t.half())
    u = t.clone()
    u[3] = 3.0000002
    assert H.tensor_digest(u) != H.tensor_digest(t)


def test_merkle_root_changes_with_any_leaf_or_order():
    leaves = [H.sha256_bytes(bytes([i])) for i in range(5)]
    root = H.merkle_root(leaves)
    assert root == H.merkle_root(list(leaves))
    assert root != H.merkle_root(leaves[::-1])
    assert root != H.merkle_root(leaves[:4])
    d = {"a": leaves[0], "b": leaves[1]}
    assert H.named_merkle_root(d) != H.named_merkle_root({"a": leaves[0], "c": leaves[1]})
