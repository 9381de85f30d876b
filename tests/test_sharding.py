"""Sharded training on 8 fake CPU devices equals training on one device."""

import jax
import ml_collections
import optax
import numpy as np
import pytest

from t5x_like import config as config_lib
from t5x_like import partitioning, trainer
from t5x_like.errors import UserError


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


def run_steps(cfg, devices, n=3):
    mesh = partitioning.make_mesh(cfg.mesh, devices)
    with jax.set_mesh(mesh):
        spec = trainer.state_spec(cfg, mesh)
        train_step, _ = trainer.compile_steps(cfg, spec, mesh)
        state = trainer.init_state(cfg, spec)
        losses = []
        for i in range(n):
            state, metrics = train_step(state, trainer.global_batch(fake_batch(cfg), mesh))
            losses.append(float(metrics["loss"]))
        return losses, jax.device_get(state["params"]), state


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


def test_parameters_are_sharded_by_the_rules(tiny_cfg):
    cfg = resolved(tiny_cfg, data=2, fsdp=2, tensor=2)
    _, _, state = run_steps(cfg, jax.devices(), n=1)
    params = state["params"]
    shard = lambda x: x.addressable_shards[0].data.shape
    # wq [L, d, H, D] -> (layers, embed->fsdp, heads->tensor, head_dim)
    assert shard(params["layers"]["wq"]) == (2, 16, 2, 8)
    assert shard(params["layers"]["w_down"]) == (2, 32, 16)  # (layers, mlp->tensor, embed->fsdp)
    assert shard(params["embed"]) == (192, 16)  # (vocab->tensor, embed->fsdp)
    assert shard(params["final_norm"]) == (32,)  # norms replicated
    # Adam moments shard like their parameters.
    mu = optax.tree_utils.tree_get(state["opt_state"], "mu")
    assert shard(mu["layers"]["wq"]) == (2, 16, 2, 8)


def test_impossible_meshes_fail_before_compute(tiny_cfg):
    with pytest.raises(UserError, match=r"needs 3 devices but 8 are available"):
        partitioning.make_mesh(ml_collections.ConfigDict(dict(data=3, fsdp=1, tensor=1)))
    with pytest.raises(UserError, match=r"does not divide the 8 devices"):
        partitioning.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=3, tensor=1)))
    cfg = config_lib.resolve(tiny_cfg, 300)  # num_kv_heads=2
    mesh = partitioning.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=1, tensor=4)))
    with pytest.raises(UserError, match=r"parameter layers/wk has 2 along 'kv_heads'.*size 4"):
        trainer.state_spec(cfg, mesh)
    tiny_cfg.data.batch_size = 4
    tiny_cfg.eval.batch_size = 4
    mesh = partitioning.make_mesh(ml_collections.ConfigDict(dict(data=8, fsdp=1, tensor=1)))
    with pytest.raises(UserError, match=r"'data.batch_size': 4 is not divisible"):
        trainer.check_batch(config_lib.resolve(tiny_cfg, 300), mesh)


def test_rules_never_reuse_a_mesh_axis():
    assert partitioning.logical_to_spec(("act_batch", "act_len", "act_embed")) == \
        jax.sharding.PartitionSpec(("data", "fsdp"), None, None)
    custom = (("a", "fsdp"), ("b", ("fsdp", "tensor")))
    assert partitioning.logical_to_spec(("a", "b"), custom) == \
        jax.sharding.PartitionSpec("fsdp", "tensor")
