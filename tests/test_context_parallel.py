"""Context parallelism (mesh.sequence) and key/value heads kept whole on a larger tensor axis:
5 train steps on 8 fake CPU devices give the losses (and parameters) of one device."""

import jax
import numpy as np
import pytest

import test_sharding
from t5x_like.core import config as config_lib
from t5x_like.modeling import partitioning
from t5x_like.training import state as state_lib
from test_sharding import run_steps


def packed_batch(cfg, seed=0):
    """Rows of packed documents of uneven lengths (positions restarting in each) and some
    padding: with T = 32 split over 2, 4 or 8 devices, documents start and end inside shards
    and run across their boundaries."""
    rng = np.random.default_rng(seed)
    B, T = cfg.data.batch_size, cfg.model.max_len
    segments = np.zeros((B, T), np.int32)
    positions = np.zeros((B, T), np.int32)
    for row in range(B):
        cuts = np.sort(rng.choice(np.arange(3, T - 4), 2, replace=False))
        lengths = [cuts[0], cuts[1] - cuts[0], T - 3 - cuts[1]]  # 3 positions of padding
        start = 0
        for doc, n in enumerate(lengths):
            segments[row, start:start + n] = doc + 1
            positions[row, start:start + n] = np.arange(n)
            start += n
    return {"inputs": rng.integers(4, 300, (B, T)).astype(np.int32),
            "targets": rng.integers(4, 300, (B, T)).astype(np.int32),
            "weights": (segments > 0).astype(np.float32), "segment_ids": segments,
            "positions": positions}


def resolved(tiny_cfg, **keys):
    """tiny_cfg (2 kv heads) on a mesh of the given axes (the rest 1); model.* keys too."""
    cfg = tiny_cfg.copy_and_resolve_references()
    mesh = {k: v for k, v in keys.items() if k in partitioning.MESH_AXES}
    cfg.mesh.update({"data": 1, "fsdp": 1, "tensor": 1, **mesh})
    cfg.model.update({k: v for k, v in keys.items() if k not in mesh})
    return config_lib.resolve(cfg, 300)


def assert_same(run, reference, what, atol=2e-6):
    """The losses within 1e-5 (relative), the final parameters close: AdamW divides each
    update by the root of its squared gradients, which turns float rounding in a near-zero
    gradient into a visible difference (MoE models, whose sums run in other orders: atol)."""
    losses, params, _ = run
    one_losses, one_params, _ = reference
    np.testing.assert_allclose(losses, one_losses, rtol=1e-5, err_msg=what)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=atol,
                                                         err_msg=what), params, one_params)


# Sequence axis 8 alone, 4 with data, 2 with fsdp and tensor; the 2- and 4-device meshes of the
# sequence axis alone run with -m slow (the same code on fewer devices).
MESHES = [(dict(sequence=8), 8), (dict(sequence=4, data=2), 8),
          (dict(sequence=2, fsdp=2, tensor=2), 8),
          pytest.param(dict(sequence=2), 2, marks=pytest.mark.slow),
          pytest.param(dict(sequence=4), 4, marks=pytest.mark.slow)]


@pytest.mark.parametrize("mesh,devices", MESHES)
def test_sequence_axis_steps_match_one_device(tiny_cfg, monkeypatch, mesh, devices):
    monkeypatch.setattr(test_sharding, "fake_batch", packed_batch)
    reference = run_steps(resolved(tiny_cfg), jax.devices()[:1])
    assert reference[0][-1] < reference[0][0]
    assert_same(run_steps(resolved(tiny_cfg, **mesh), jax.devices()[:devices]),
                reference, str(mesh))


@pytest.mark.slow
def test_chunked_attention_and_windows_on_the_sequence_axis(tiny_cfg, monkeypatch):
    """attention_impl=chunked (online softmax over key blocks) and sliding-window layers with
    the sequence split 4 ways: the windows reach across shard boundaries."""
    monkeypatch.setattr(test_sharding, "fake_batch", packed_batch)
    keys = dict(attention_impl="chunked", attention_block=4, sliding_window=6, global_every=2)
    reference = run_steps(resolved(tiny_cfg, attention_impl="einsum", sliding_window=6,
                                   global_every=2), jax.devices()[:1], n=3)
    assert_same(run_steps(resolved(tiny_cfg, **keys), jax.devices()[:1], n=3), reference,
                "chunked, one device", atol=5e-5)
    assert_same(run_steps(resolved(tiny_cfg, sequence=4, tensor=2, **keys), jax.devices(), n=3),
                reference, "chunked, sequence 4 x tensor 2", atol=5e-5)


def test_tensor_axis_larger_than_the_kv_heads(tiny_cfg):
    """The tiny config's 2 key/value heads on tensor=4: kept whole on every tensor shard (each
    shard repeats the one its query head reads), the losses of one device."""
    cfg = resolved(tiny_cfg, data=2, tensor=4)
    mesh = partitioning.make_mesh(cfg.mesh)
    with jax.set_mesh(mesh):
        params = state_lib.state_spec(cfg, mesh).abstract["params"]
    wk, wq = params["layers"]["wk"], params["layers"]["wq"]
    assert wk.sharding.shard_shape(wk.shape) == (2, 32, 2, 8)  # whole: 2 heads on 4 shards
    assert wq.sharding.shard_shape(wq.shape) == (2, 32, 1, 8)  # one query head per shard
    assert_same(run_steps(cfg, jax.devices()), run_steps(resolved(tiny_cfg), jax.devices()[:1]),
                "data 2 x tensor 4")


def test_sequence_axis_must_divide_the_length(tiny_cfg):
    from t5x_like.core.errors import UserError

    tiny_cfg.mesh.sequence = 3
    with pytest.raises(UserError, match=r"mesh.sequence.*3 must divide model.max_len \(32\)"):
        config_lib.validate(tiny_cfg)


@pytest.mark.parametrize("softcap,window,chunk", [(0.0, 0, 8), (1.5, 5, 6)])
def test_chunked_attention_equals_the_whole_score_matrix(softcap, window, chunk):
    """attention_impl=chunked (tiles, online softmax, its own backward pass, masked tiles
    skipped): the output and gradients of the einsum attention, for every row that sees a key
    (padding rows are read by nothing, and their weight here is 0)."""
    from t5x_like.modeling import model

    B, T, H, K, D = 2, 24, 4, 2, 8
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (B, T, H, D))
    k, v = (jax.random.normal(key, (B, T, K, D)) for key in keys[1:3])
    seg = jax.numpy.asarray([[1] * 10 + [2] * 10 + [0] * 4, [1] * 5 + [2] * 19])
    idx = jax.numpy.arange(T)
    w = jax.random.normal(keys[3], (B, T, H, D)) * (seg > 0)[:, :, None, None]
    local = jax.numpy.asarray(bool(window))
    mask = model._flash_mask(idx, idx, seg, seg, local, window)

    def whole(q, k, v):
        return (model._attend(q, k, v, mask, None, softcap) * w).sum()

    def chunked(q, k, v):
        return (model.chunked_attention(q, k, v, idx, idx, seg, seg, local, chunk=chunk,
                                        softcap=softcap, window=window) * w).sum()

    want, want_grads = jax.value_and_grad(whole, argnums=(0, 1, 2))(q, k, v)
    got, got_grads = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for a, b in zip(got_grads, want_grads):
        np.testing.assert_allclose(a, b, atol=3e-6)
