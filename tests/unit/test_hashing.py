import numpy as np
import pytest
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


# ---- the layout-independent tensor digest (kmoe-merkle/1)


def spec_digest(t: torch.Tensor) -> str:
    """kmoe-merkle/1 written out from its definition in docs/ledger.md, independently of kmoe.hashing."""
    import hashlib

    B = H.LEAF_ELEMS
    lines = t.detach().contiguous().reshape(-1, t.shape[-1] if t.dim() else 1)
    leaves = []
    for line in lines:
        raw = line.view(torch.uint8).numpy().tobytes()
        es = t.element_size()
        for a in range(0, line.numel(), B):
            leaves.append(hashlib.sha256(b"\x00" + raw[a * es : (a + B) * es]).digest())

    def mth(xs):
        if len(xs) == 1:
            return xs[0]
        k = 1
        while k * 2 < len(xs):
            k *= 2
        return hashlib.sha256(b"\x01" + mth(xs[:k]) + mth(xs[k:])).digest()

    root = mth(leaves) if leaves else hashlib.sha256(b"").digest()
    head = H.canonical_json({"dtype": str(t.dtype).removeprefix("torch."), "leaf_elems": B,
                             "scheme": H.TENSOR_SCHEME, "shape": list(t.shape)})  # fmt: skip
    return hashlib.sha256(b"\x02" + head + root).hexdigest()


SHAPES = [(), (1,), (7,), (1024,), (1025,), (3000,), (5, 3), (4, 2049), (3, 4, 1100), (2, 3, 2, 700), (0, 5)]


@pytest.mark.parametrize("shape", SHAPES)
def test_layout_digest_follows_the_written_definition(shape):
    g = torch.Generator().manual_seed(len(shape) * 31 + sum(shape))
    t = torch.randn(shape, generator=g)
    assert H.layout_digest(t) == spec_digest(t)
    assert H.layout_digest(t) == H.layout_digest(t.numpy())
    assert H.layout_digest(t.bfloat16()) == spec_digest(t.bfloat16())


def test_layout_digest_binds_dtype_shape_and_every_element():
    t = torch.randn(4, 2500)
    d = H.layout_digest(t)
    assert d != H.layout_digest(t.reshape(2, 5000)) != H.layout_digest(t.reshape(-1))
    assert d != H.layout_digest(t.double())
    assert H.layout_digest(t.bfloat16()) != H.layout_digest(t.half())
    for idx in [(0, 0), (1, 1023), (1, 1024), (3, 2499)]:
        u = t.clone()
        u[idx] = torch.nextafter(u[idx], torch.tensor(1e9))
        assert H.layout_digest(u) != d, idx


def chunk_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """torch.chunk / DTensor Shard semantics: ceil-sized pieces, the last ones short or empty."""
    size = -(-n // parts)
    return [(min(i * size, n), min((i + 1) * size, n)) for i in range(parts)]


def sharded(t: torch.Tensor, splits: dict[int, int]) -> list[H.Pieces]:
    """Pieces of every block of `t` split `splits[dim]` ways along each dim (a mesh of any rank)."""
    import itertools

    meta = H.meta_of(t)
    axes = [chunk_bounds(t.shape[d], splits.get(d, 1)) for d in range(t.dim())]
    out = []
    for box in itertools.product(*axes):
        block = t[tuple(slice(a, b) for a, b in box)]
        out.append(H.box_pieces(meta, [a for a, _ in box], block))
    return out


CASES = [
    ((10, 300), {0: 4}),  # FSDP2 Shard(0), uneven
    ((3, 7), {0: 8}),  # more ranks than rows: empty shards
    ((8, 6, 2100), {0: 2}),  # EP Shard(0) on the expert dim
    ((8, 6, 2100), {0: 2, 1: 4}),  # 2-D mesh: EP on experts, FSDP Shard(1)
    ((8, 9, 1030), {0: 4, 1: 3}),
    ((6, 4096), {1: 4}),  # split inside lines at multiples of the leaf: hashes only
    ((6, 3000), {1: 7}),  # split inside lines off the leaf grid: fragments
    ((4000,), {0: 3}),  # a 1-D tensor (norm weight) under FSDP2
    ((3, 5, 2, 1500), {0: 3, 2: 2, 3: 3}),
]


@pytest.mark.parametrize(("shape", "splits"), CASES)
def test_any_sharding_gives_the_full_tensor_digest(shape, splits):
    t = torch.randn(shape)
    full = H.layout_digest(t)
    pieces = sharded(t, splits)
    assert H.combine_pieces(pieces) == full
    assert H.combine_pieces(pieces[::-1]) == full  # order of arrival does not matter
    assert H.combine_pieces(pieces + pieces[:1]) == full  # a replica sending the same block again
    assert H.combine_pieces(sharded(t.bfloat16(), splits)) == H.layout_digest(t.bfloat16())


def test_whole_line_shards_send_hashes_only():
    t = torch.randn(16, 2 * H.LEAF_ELEMS)
    for splits in ({0: 5}, {1: 2}):
        pieces = sharded(t, splits)
        assert not any(p.frags for p in pieces)
        assert sum(len(p.nodes) for p in pieces) < 8 * 2 * 6  # O(log leaves) nodes per block


@pytest.mark.parametrize("cuts", [[0, 1, 1025, 5000], [0, 2048, 2049, 9999, 12000], [0, 12000]])
def test_flat_zero_style_ranges_give_the_same_digest(cuts):
    t = torch.randn(4, 3000)
    flat, meta = t.reshape(-1), H.meta_of(t)
    pieces = [H.flat_pieces(meta, a, flat[a:b]) for a, b in zip(cuts, cuts[1:] + [flat.numel()]) if a < b]
    assert H.combine_pieces(pieces) == H.layout_digest(t)
    frag_bytes = sum(len(data) for p in pieces for _, _, data in p.frags)
    assert frag_bytes < 2 * len(cuts) * H.LEAF_ELEMS * t.element_size()  # only cut leaves travel


def test_a_missing_or_disagreeing_shard_is_named():
    t = torch.randn(8, 2000)
    pieces = sharded(t, {0: 4})
    with pytest.raises(H.DigestError, match=r"elements \[2, 0:1024\] is held by no shard"):
        H.combine_pieces(pieces[:1] + pieces[2:])
    other = sharded(t + 1, {0: 4})
    with pytest.raises(H.DigestError, match="disagree"):
        H.combine_pieces(pieces + other[:1])
    cut = sharded(torch.randn(4000), {0: 3})
    with pytest.raises(H.DigestError, match="cover"):
        H.combine_pieces(cut[:2])


def test_state_digests_default_to_the_merkle_scheme_and_keep_the_legacy_one():
    state = {"a": torch.ones(3, 4), "b": torch.zeros(2)}
    assert H.state_digests(state) == {k: H.layout_digest(v) for k, v in state.items()}
    assert H.state_digests(state, H.LEGACY_SCHEME) == {k: H.tensor_digest(v) for k, v in state.items()}
    with pytest.raises(ValueError, match="unknown tensor digest scheme"):
        H.digest_as(state["a"], "md5")
