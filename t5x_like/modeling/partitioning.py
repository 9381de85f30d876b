"""Where every tensor lives: the device mesh and the one table of logical-axis rules.

Parameters and key activations are named with logical axes where they are created (model.py:
`("embed", "mlp")`, `("act_batch", "act_len", "act_embed")`); RULES below maps each logical
name to mesh axes. Change a rule here (or override it from config) and every tensor with that
name moves; nothing else in the code names mesh axes, except the batch sharding.

Mesh axes:  data      pure data parallelism (parameters replicated)
            fsdp      data parallelism with parameters and optimizer state sharded (ZeRO-3 style)
            expert    expert parallelism: each device holds E / expert of a MoE layer's experts;
                      for everything else it is one more data-parallel axis (the batch is split
                      over it, other parameters replicated), as in GShard and MaxText
            sequence  context parallelism: activations split along the sequence; attention
                      all-gathers keys and values across it (model.context_attention)
            tensor    tensor (model) parallelism: heads and MLP hidden units split across devices

The order is the device order too: tensor innermost (its collectives run every layer, on the
fastest links), then sequence, expert, fsdp, data.

Key/value heads: a tensor axis larger than model.num_kv_heads cannot split them, so they are
kept whole on every tensor shard (REPLICATE_IF_INDIVISIBLE), and the model repeats each one
for the query heads of its shard (model.kv_repeat), as MaxText does; any tensor size that
divides the query heads then works with grouped-query attention.
"""

import contextlib
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from t5x_like.core.errors import UserError

MESH_AXES = ("data", "fsdp", "expert", "sequence", "tensor")
# Axes that split the batch (data parallelism of some kind): data_parallel_size multiplies them.
BATCH_AXES = ("data", "fsdp", "expert")

# logical axis name -> mesh axis (or axes, or None = replicated). Parameters first, then
# activations ("act_*"). The batch of every activation is split over data, fsdp and expert, its
# sequence over sequence; an activation's embed dimension is not split, since fsdp is already
# used by its batch.
RULES: tuple[tuple[str, Any], ...] = (
    ("vocab", "tensor"),
    # ZeRO-3 over every axis that splits the tokens (not tensor): the sequence and expert axes
    # are data-parallel for the weights, so they shard them too, gathered per layer (MaxText).
    ("embed", ("fsdp", "sequence", "expert")),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("lora_rank", None),  # LoRA adapters' rank: small, kept whole (peft.py)
    ("experts", "expert"),  # a MoE layer's experts (model.moe_mlp)
    ("expert_mlp", "tensor"),  # an expert's hidden units
    ("act_batch", ("data", "fsdp", "expert")),
    ("act_len", "sequence"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)

# Logical names whose dimension stays whole (replicated) when its mesh axes do not divide it,
# instead of being an error: key/value heads on a tensor axis larger than their number.
REPLICATE_IF_INDIVISIBLE = ("kv_heads", "act_kv_heads")

_active_rules: list[tuple[tuple[str, Any], ...]] = [RULES]


def rules_with_overrides(overrides: str) -> tuple[tuple[str, Any], ...]:
    """RULES with entries replaced from `mesh.rules`, e.g. "embed=none,mlp=tensor+fsdp".

    Each entry is logical_name=axis[+axis...] or =none (replicated); names not given keep the
    table's rule. Unknown names or mesh axes are a UserError naming them.
    """
    table = dict(RULES)
    for entry in filter(None, (e.strip() for e in overrides.split(","))):
        name, sep, value = (part.strip() for part in entry.partition("="))
        if not sep or name not in table:
            raise UserError(f"config key 'mesh.rules': {entry!r} must be logical_name=axes with a "
                            f"name from partitioning.RULES ({', '.join(table)}).")
        axes = tuple(a.strip() for a in value.split("+")) if value.lower() != "none" else ()
        bad = [a for a in axes if a not in MESH_AXES]
        if bad:
            raise UserError(f"config key 'mesh.rules': {entry!r} names mesh axis {bad[0]!r}; use "
                            f"{', '.join(MESH_AXES)} (joined with +) or none.")
        table[name] = None if not axes else axes[0] if len(axes) == 1 else axes
    return tuple(table.items())


@contextlib.contextmanager
def axis_rules(rules: Sequence[tuple[str, Any]]) -> Iterator[None]:
    """Makes `rules` the table used by `constrain` while tracing inside this context."""
    _active_rules.append(tuple(rules))
    try:
        yield
    finally:
        _active_rules.pop()


def logical_to_spec(names: Sequence[str | None], rules=None, shape=None,
                    mesh=None) -> PartitionSpec:
    """("embed", "mlp") -> PartitionSpec("fsdp", "tensor"), never using one mesh axis twice.

    With `shape` (and the `mesh`, default the current one), a REPLICATE_IF_INDIVISIBLE name
    whose dimension its axes do not divide is left whole (and frees its axes for later names).
    With a mesh (given or current), its axes of size 1 are left out: the same sharding, and
    specs that name only the axes that split something.
    """
    table = dict(rules if rules is not None else _active_rules[-1])
    if mesh is None and not jax.sharding.get_abstract_mesh().empty:
        mesh = jax.sharding.get_abstract_mesh()
    used: set[str] = set()
    spec = []
    for i, name in enumerate(names):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no rule in partitioning.RULES")
        axes = table[name]
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if a not in used)
        if mesh is not None:
            axes = tuple(a for a in axes if mesh.shape[a] > 1)
        if shape is not None and mesh is not None and name in REPLICATE_IF_INDIVISIBLE and axes:
            if shape[i] % _axis_size(mesh, axes):
                axes = ()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Pins an activation's sharding by logical names; a no-op when no mesh is set."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, shape=x.shape, mesh=mesh))


def axis_size(name: str) -> int:
    """How many shards the logical axis `name` has under the current mesh and rules (1 with no
    mesh): e.g. axis_size("act_len") is the sequence axis's size."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    return _axis_size(mesh, logical_to_spec((name,))[0])


def mesh_axes(name: str) -> tuple[str, ...]:
    """The mesh axes the logical axis `name` maps to under the current rules (maybe none)."""
    entry = logical_to_spec((name,))[0]
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
    """Resolves -1 and checks that the mesh uses exactly the available devices. Sizes in
    MESH_AXES order; an axis the config lacks (one written before it existed) is 1."""
    sizes = [mesh_cfg.get(name, 1) for name in MESH_AXES]
    fixed = int(np.prod([s for s in sizes if s != -1]))
    desc = ", ".join(f"mesh.{n}={s}" for n, s in zip(MESH_AXES, sizes) if s != 1 or n in (
        "data", "fsdp", "tensor"))
    if -1 in sizes:
        if num_devices % fixed:
            raise UserError(f"mesh ({desc}) does not divide the {num_devices} devices: the fixed "
                            f"axes multiply to {fixed}; pick sizes whose product divides "
                            f"{num_devices}.")
        sizes[sizes.index(-1)] = num_devices // fixed
    elif fixed != num_devices:
        raise UserError(f"mesh ({desc}) needs {fixed} devices but {num_devices} are available; "
                        f"make the product {num_devices} or set one axis to -1.")
    return tuple(sizes)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(mesh_cfg, len(devices))
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if len(devices) == len(jax.devices()):  # lets JAX pick a topology-aware device order
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    return Mesh(np.array(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def _axis_size(mesh, entry) -> int:
    axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
    return int(np.prod([mesh.shape[a] for a in axes]))


def named_sharding(mesh: Mesh, shape: Sequence[int], names: Sequence[str | None], what: str,
                   rules=None) -> NamedSharding:
    """NamedSharding for one tensor; a dimension its mesh axes do not divide is a UserError
    (except the REPLICATE_IF_INDIVISIBLE names, kept whole then)."""
    if len(names) != len(shape):
        raise ValueError(f"{what}: {len(names)} axis names {tuple(names)} for shape {shape}")
    spec = logical_to_spec(names, rules, shape=shape, mesh=mesh)
    for dim, name, entry in zip(shape, names, spec):
        size = _axis_size(mesh, entry)
        if dim % size:
            raise UserError(
                f"{what} has {dim} along '{name}', which mesh axis {entry} of size {size} does "
                f"not divide; change the model size or the mesh (or the rule for '{name}').")
    return NamedSharding(mesh, spec)


def tree_shardings(mesh: Mesh, abstract_tree, names_tree, rules=None):
    """Shardings for a pytree of arrays given a matching pytree of logical-name tuples."""
    def one(path, leaf, names):
        what = "parameter " + "/".join(str(getattr(k, "key", k)) for k in path)
        return named_sharding(mesh, leaf.shape, names, what, rules)
    return jax.tree.map_with_path(one, abstract_tree, names_tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Input batches [batch, ...]: batch split over the batch axes (data x fsdp x expert).
    The sequence stays whole here (features may be [batch] only); the model splits it over
    the sequence axis where the tokens are embedded, a local slice."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh) -> int:
    """Devices that hold different rows of the batch: mesh.data x mesh.fsdp x mesh.expert."""
    return int(np.prod([mesh.shape.get(a, 1) for a in BATCH_AXES]))
