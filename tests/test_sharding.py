"""Sharded training on 8 fake CPU devices equals training on one device."""

import jax
import ml_collections
import optax
import numpy as np
import pytest

from t5x_like.core import config as config_lib
from t5x_like.modeling import partitioning
from t5x_like.training import batches as batches_lib
from t5x_like.training import state as state_lib
from t5x_like.training.tasks import lm
from t5x_like.core.errors import UserError


def resolved(tiny_cfg, **mesh):
    tiny_cfg.model.num_kv_heads = 4  # divisible by every tensor size used below
    tiny_cfg.mesh.update({"data": 1, "fsdp": 1, "tensor": 1, **mesh})
    return config_lib.resolve(tiny_cfg, 300)


def fake_batch(cfg, seed=0):
    rng = np.random.default_rng(seed)
    B, T = cfg.data.batch_size, cfg.model.max_len
    segments = np.repeat(np.array([[1] * (T // 2) + [2] * (T // 4) + [0] * (T // 4)]), B, 0)
    positions = np.concatenate([np.arange(T // 2), np.arange(T // 4), np.zeros(T // 4)])
    return {"inputs": rng.integers(4, 300, (B, T)).astype(np.int32),
            "targets": rng.integers(4, 300, (B, T)).astype(np.int32),
            "weights": (segments > 0).astype(np.float32),
            "segment_ids": segments.astype(np.int32),
            "positions": np.repeat(positions[None], B, 0).astype(np.int32)}


def run_steps(cfg, devices, n=5, keys=("loss",), vary_batch=False):
    """n real train steps on a mesh of `devices`: ([loss per step] or, with several `keys`,
    [tuple of those metrics per step], final params on the host, final state)."""
    mesh = partitioning.make_mesh(cfg.mesh, devices)
    with jax.set_mesh(mesh):
        spec = state_lib.state_spec(cfg, mesh)
        train_step, _ = lm.compile_steps(cfg, spec, mesh)
        state = state_lib.init_state(cfg, spec)
        out = []
        for i in range(n):
            batch = fake_batch(cfg, i if vary_batch else 0)
            state, metrics = train_step(state, batches_lib.global_batch(batch, mesh))
            values = tuple(float(metrics[k]) for k in keys)
            out.append(values if len(keys) > 1 else values[0])
        return out, jax.device_get(state["params"]), state


# (data, fsdp, tensor) = (8,1,1), (1,8,1), (2,2,2), (1,4,2), (2,1,4); the reference is (1,1,1)
# on one device.
MESHES = [dict(data=8), dict(fsdp=8), dict(data=2, fsdp=2, tensor=2), dict(fsdp=4, tensor=2),
          dict(data=2, tensor=4)]


def test_sharded_steps_match_one_device(tiny_cfg):
    one_losses, one_params, _ = run_steps(resolved(tiny_cfg.copy_and_resolve_references()),
                                          jax.devices()[:1])
    assert one_losses[-1] < one_losses[0]
    for mesh in MESHES:
        losses, params, _ = run_steps(resolved(tiny_cfg.copy_and_resolve_references(), **mesh),
                                      jax.devices())
        np.testing.assert_allclose(losses, one_losses, rtol=1e-5, err_msg=str(mesh))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6,
                                                             err_msg=str(mesh)),
                     params, one_params)


@pytest.mark.parametrize("mesh", [dict(data=2, fsdp=2, tensor=2), dict(data=2, tensor=4)])
def test_chunked_loss_on_a_mesh_matches_one_device(tiny_cfg, mesh):
    """model.loss_chunk with the batch sharded over data and the vocab over tensor, against
    the whole logits on one device."""
    one = tiny_cfg.copy_and_resolve_references()
    one.model.loss_chunk = 0
    one_losses, one_params, _ = run_steps(resolved(one), jax.devices()[:1], n=3)
    cfg = tiny_cfg.copy_and_resolve_references()
    cfg.model.loss_chunk = 12
    losses, params, _ = run_steps(resolved(cfg, **mesh), jax.devices(), n=3)
    np.testing.assert_allclose(losses, one_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6),
                 params, one_params)


# Per-device shard shapes written out by hand from the rules table (not computed by the code
# under test): model d=32, H=K=4, D=8, F=64, V=384, L=2.
EXPECTED_SHARDS = {
    "fsdp=8": {"embed": (384, 4), "layers/wq": (2, 4, 4, 8), "layers/wk": (2, 4, 4, 8),
               "layers/wo": (2, 4, 8, 4), "layers/w_gate": (2, 4, 64), "layers/w_down": (2, 64, 4),
               "lm_head": (4, 384), "layers/attn_norm": (2, 32), "final_norm": (32,)},
    "data=2,fsdp=2,tensor=2": {
        "embed": (192, 16), "layers/wq": (2, 16, 2, 8), "layers/wk": (2, 16, 2, 8),
        "layers/wo": (2, 2, 8, 16), "layers/w_gate": (2, 16, 32), "layers/w_down": (2, 32, 16),
        "lm_head": (16, 192), "layers/attn_norm": (2, 32), "final_norm": (32,)},
    "data=2,tensor=4": {
        "embed": (96, 32), "layers/wq": (2, 32, 1, 8), "layers/wk": (2, 32, 1, 8),
        "layers/wo": (2, 1, 8, 32), "layers/w_gate": (2, 32, 16), "layers/w_down": (2, 16, 32),
        "lm_head": (32, 96), "layers/attn_norm": (2, 32), "final_norm": (32,)},
    "data=8": {"embed": (384, 32), "layers/wq": (2, 32, 4, 8), "layers/w_down": (2, 64, 32)},
}


@pytest.mark.parametrize("mesh", list(EXPECTED_SHARDS))
def test_parameters_are_sharded_by_the_rules(tiny_cfg, mesh):
    axes = {k: int(v) for k, v in (part.split("=") for part in mesh.split(","))}
    cfg = resolved(tiny_cfg, **axes)
    mesh_ = partitioning.make_mesh(cfg.mesh)
    with jax.set_mesh(mesh_):
        spec = state_lib.state_spec(cfg, mesh_)
    params = spec.abstract["params"]
    for name, want in EXPECTED_SHARDS[mesh].items():
        leaf = params
        for part in name.split("/"):
            leaf = leaf[part]
        assert leaf.sharding.shard_shape(leaf.shape) == want, name
    # Adam moments shard like their parameters.
    mu = optax.tree_utils.tree_get(spec.abstract["opt_state"], "mu")
    assert mu["layers"]["wq"].sharding == params["layers"]["wq"].sharding


def test_rules_can_be_overridden_from_config(tiny_cfg):
    tiny_cfg.mesh.rules = "embed=none,mlp=fsdp+tensor"
    cfg = resolved(tiny_cfg, fsdp=4, tensor=2)
    mesh = partitioning.make_mesh(cfg.mesh)
    rules = partitioning.rules_with_overrides(cfg.mesh.rules)
    with jax.set_mesh(mesh), partitioning.axis_rules(rules):
        params = state_lib.state_spec(cfg, mesh).abstract["params"]
    gate = params["layers"]["w_gate"]  # (layers, embed, mlp) -> (None, None, (fsdp, tensor))
    assert gate.sharding.shard_shape(gate.shape) == (2, 32, 8)
    for bad, message in [("embedd=fsdp", "name from partitioning.RULES"),
                         ("embed=model", "names mesh axis 'model'"), ("embed", "logical_name=axes")]:
        with pytest.raises(UserError, match=message):
            partitioning.rules_with_overrides(bad)


def test_impossible_meshes_fail_before_compute(tiny_cfg):
    with pytest.raises(UserError, match=r"needs 3 devices but 8 are available"):
        partitioning.make_mesh(ml_collections.ConfigDict(dict(data=3, fsdp=1, tensor=1)))
    with pytest.raises(UserError, match=r"does not divide the 8 devices"):
        partitioning.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=3, tensor=1)))
    cfg = config_lib.resolve(tiny_cfg, 300)  # num_heads=4 (kv heads may be kept whole)
    mesh = partitioning.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=8)))
    with pytest.raises(UserError, match=r"parameter layers/w[oq] has 4 along 'heads'.*size 8"):
        state_lib.state_spec(cfg, mesh)
    tiny_cfg.data.batch_size = 4
    tiny_cfg.eval.batch_size = 4
    mesh = partitioning.make_mesh(ml_collections.ConfigDict(dict(data=8, fsdp=1, tensor=1)))
    with pytest.raises(UserError, match=r"'data.batch_size': 4 is not divisible"):
        batches_lib.check_batch(config_lib.resolve(tiny_cfg, 300), mesh)


def test_rules_never_reuse_a_mesh_axis():
    assert partitioning.logical_to_spec(("act_batch", "act_len", "act_embed")) == \
        jax.sharding.PartitionSpec(("data", "fsdp", "expert"), "sequence", None)
    # A MoE expert weight: the experts take the expert axis, so its embed dim does not.
    assert partitioning.logical_to_spec(("layers", "experts", "embed", "expert_mlp")) == \
        jax.sharding.PartitionSpec(None, "expert", ("fsdp", "sequence"), "tensor")
    custom = (("a", "fsdp"), ("b", ("fsdp", "tensor")))
    assert partitioning.logical_to_spec(("a", "b"), custom) == \
        jax.sharding.PartitionSpec("fsdp", "tensor")
