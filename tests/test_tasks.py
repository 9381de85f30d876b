"""The one train step of every task: gradient accumulation equals one large batch, chunked
sequence log-probs equal full ones, RL on 2 processes equals RL on 1; and the training modules
import no private names of each other and no cycle."""

import ast
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import ROOT
from t5x_like.core import config as config_lib
from t5x_like.modeling import partitioning
from t5x_like.training import preference
from t5x_like.training import rl
from t5x_like.training import state as state_lib
from t5x_like.training import steps
from t5x_like.training.tasks import pairs

# float32 throughout; the sums of 4 micro-batches and of one batch differ by rounding only.
# Measured (2 CPU devices, tiny model): relative gradient error <= 3e-7, loss <= 1e-7.
RTOL = 1e-5


def setup(tiny_cfg, task, **model):
    cfg = tiny_cfg.copy_and_resolve_references()
    cfg.task, cfg.init_from = task, "x"
    cfg.dpo.rpo_alpha = 0.5  # DPO with the chosen reply's NLL term too
    cfg.model.update(dtype="float32", reward_head=task == "reward", **model)
    cfg = config_lib.resolve(cfg, 300)
    mesh = partitioning.make_mesh({"data": 2}, jax.devices()[:2])
    return cfg, mesh


def pair_batch(cfg, pairs_=16, seed=0):
    """Random pairs [P, 2, T] with prompts of 8 tokens and replies of different lengths."""
    rng = np.random.default_rng(seed)
    T = cfg.model.max_len
    weights = np.zeros((pairs_, 2, T), np.float32)
    for i in range(pairs_):
        for r in range(2):
            weights[i, r, 8:8 + rng.integers(3, T - 8)] = 1.0
    return {"inputs": rng.integers(3, 300, (pairs_, 2, T)).astype(np.int32),
            "targets": rng.integers(3, 300, (pairs_, 2, T)).astype(np.int32),
            "weights": weights, "segment_ids": np.ones((pairs_, 2, T), np.int32),
            "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (pairs_, 2, T)).copy()}


def reply_batch(cfg, rows=16, seed=0):
    """RL rows [N, T] (pair_batch's chosen rows) with advantages."""
    batch = {k: v[:, 0] for k, v in pair_batch(cfg, rows, seed).items()}
    batch["advantages"] = np.random.default_rng(seed + 1).normal(size=rows).astype(np.float32)
    return batch


@jax.jit
def perturbed(params, scale=0.05, seed=1):
    """Another model near `params`: a policy that has moved away from its reference."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape, x.dtype)
                                     for x, k in zip(leaves, keys)])


def assert_trees_close(a, b, rtol=RTOL):
    """Every leaf within rtol of the largest magnitude of its tree (gradients near zero have
    no meaningful relative error)."""
    a, b = jax.device_get(a), jax.device_get(b)
    scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(a))
    worst = max(float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a),
                                                           jax.tree.leaves(b)))
    assert worst <= rtol * scale, (worst, scale)
    print(f"largest gradient difference / largest gradient: {worst / scale:.2e}")


def normalized(loss_fn, params, batch, frozen, accum, count):
    """(gradients of the loss per example, sums) over `accum` micro-batches, jitted."""
    def run(params, batch, frozen):
        grads, sums = steps.gradients(loss_fn, params, batch, None, frozen, accum)
        n = jnp.maximum(sums[count], 1.0)
        return jax.tree.map(lambda g: g / n, grads), sums
    return jax.jit(run)(params, batch, frozen)


@pytest.mark.parametrize("task", ["dpo", "reward"])
def test_pair_tasks_accumulate_like_one_big_batch(tiny_cfg, task):
    """grad_accum_steps=4 over 16 pairs: the loss, metrics, gradients and update of one batch
    of 16 pairs (4x the micro-batch)."""
    cfg, mesh = setup(tiny_cfg, task)
    batch = pair_batch(cfg)
    with jax.set_mesh(mesh), partitioning.axis_rules(partitioning.RULES):
        spec = state_lib.state_spec(cfg, mesh)
        initial = state_lib.init_state(cfg, spec)["params"]
        params = perturbed(initial)  # a policy that has moved away from its reference
        state = state_lib.with_params(spec, params)
        reference = None if task == "reward" else initial
        stats_fn = pairs.stats_function(cfg, spec)
        one, sums_one = normalized(preference.loss(stats_fn), params, batch, reference, 1,
                                   "pairs")
        four, sums_four = normalized(preference.loss(stats_fn), params, batch, reference, 4,
                                     "pairs")
        # The job's train step with grad_accum_steps=4 against one update with `one`.
        step = preference.make_train_step(stats_fn, spec.tx, spec.schedule, seed=0,
                                          dropout=0.0, accum_steps=4)
        frozen = () if reference is None else (reference,)
        jitted = steps.jit_step(step, spec, mesh, None,
                                None if reference is None else spec.shardings["params"])
        want = jax.device_get(jax.jit(lambda g, opt, p: optax.apply_updates(
            p, spec.tx.update(g, opt, p)[0]))(one, state["opt_state"], params))
        new, metrics = jax.device_get(jitted(state, batch, *frozen))
    assert float(sums_one["pairs"]) == float(sums_four["pairs"]) == 16
    for k in sums_one:
        np.testing.assert_allclose(sums_four[k], sums_one[k], rtol=RTOL, atol=1e-6, err_msg=k)
    assert_trees_close(one, four)
    assert float(jnp.abs(jax.tree.leaves(one)[0]).max()) > 0  # there is a gradient to compare
    expected = jax.device_get(preference.train_metrics(sums_one))
    expected["grad_norm"] = optax.global_norm(one)
    assert {"loss", "accuracy", "grad_norm"} <= set(metrics)
    for k, v in expected.items():
        np.testing.assert_allclose(metrics[k], v, rtol=RTOL, atol=1e-6, err_msg=k)
    assert_trees_close(want, new["params"])


def test_rl_accumulates_like_one_big_batch(tiny_cfg):
    cfg, mesh = setup(tiny_cfg, "rl")
    batch = reply_batch(cfg)
    with jax.set_mesh(mesh), partitioning.axis_rules(partitioning.RULES):
        spec = state_lib.state_spec(cfg, mesh)
        reference = state_lib.init_state(cfg, spec)["params"]
        params = perturbed(reference)
        loss_fn = rl.make_loss(spec.graphdef, kl_coef=0.1)
        one, sums_one = normalized(loss_fn, params, batch, reference, 1, "tokens")
        four, sums_four = normalized(loss_fn, params, batch, reference, 4, "tokens")
    for k in sums_one:
        np.testing.assert_allclose(sums_four[k], sums_one[k], rtol=RTOL, err_msg=k)
    assert_trees_close(one, four)


@pytest.mark.parametrize("task", ["dpo", "rl"])
def test_chunked_log_probs_equal_full_ones(tiny_cfg, task):
    """Sequence log-probs (and the KL) 12 positions at a time, T=32 (a padded last chunk):
    the losses and gradients of the full [B, T, V] logits."""
    out = {}
    for chunk in (0, 12):
        cfg, mesh = setup(tiny_cfg, task, loss_chunk=chunk)
        with jax.set_mesh(mesh), partitioning.axis_rules(partitioning.RULES):
            spec = state_lib.state_spec(cfg, mesh)
            reference = state_lib.init_state(cfg, spec)["params"]
            params = perturbed(reference)
            if task == "dpo":
                loss_fn, batch = preference.loss(pairs.stats_function(cfg, spec)), pair_batch(cfg)
            else:  # RL: the KL is in the loss, so its gradient is compared too
                loss_fn = rl.make_loss(spec.graphdef, kl_coef=0.5, loss_chunk=chunk)
                batch = reply_batch(cfg)
            out[chunk] = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
                params, batch, None, reference)
    (loss_full, sums_full), grads_full = out[0]
    (loss_chunked, sums_chunked), grads_chunked = out[12]
    np.testing.assert_allclose(loss_chunked, loss_full, rtol=RTOL)
    # The implicit rewards and margins are differences of sequence log-probs of size ~100:
    # their float32 rounding is ~1e-5 absolute (measured 2.6e-6), whatever their own size.
    for k in sums_full:
        np.testing.assert_allclose(sums_chunked[k], sums_full[k], rtol=RTOL, atol=2e-5,
                                   err_msg=k)
    assert float(sums_full["kl_sum"]) > 0  # the policy is away from its reference
    assert_trees_close(grads_full, grads_chunked)


@pytest.mark.parametrize("kl_grad", [False, True])  # DPO, RL
def test_chunked_log_probs_never_hold_the_whole_logits(kl_grad):
    """The compiled gradient of a loss on sequence log-probs and KL (sequence_stats), chunked,
    needs less scratch memory than a quarter of one [N, T, V] float32 logits tensor;
    unchunked, more than one (measured: 3.5 (DPO) and 4.5 (RL) vs 128 MiB, against 32 MiB
    of logits)."""
    from t5x_like.modeling import model
    from t5x_like.training import preference_losses

    N, T, d, V = 16, 128, 32, 4096
    h = jax.ShapeDtypeStruct((N, T, d), jnp.float32)
    head = (jax.ShapeDtypeStruct((d, V), jnp.float32), None)
    targets = jax.ShapeDtypeStruct((N, T), jnp.int32)
    weights = jax.ShapeDtypeStruct((N, T), jnp.float32)
    temp = {}
    for chunk in (0, 4):
        def loss(head, h, ref_head, ref_h, targets, weights, chunk=chunk):
            if chunk:
                policy = (h, head, model.output_logits)
                reference = (ref_h, ref_head, model.output_logits)
            else:
                policy = model.output_logits(head, h)
                reference = model.output_logits(ref_head, ref_h)
            s = preference_losses.sequence_stats(policy, reference, targets, weights,
                                                 chunk=chunk, kl_grad=kl_grad)
            return jnp.sum(jax.nn.softplus(s["ref_logp"] - s["logp"]) + 0.1 * s["kl"])
        grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
        compiled = grad.lower(head, h, head, h, targets, weights).compile()
        temp[chunk] = compiled.memory_analysis().temp_size_in_bytes
    logits = N * T * V * 4
    print({k: f"{v / 2**20:.1f} MiB" for k, v in temp.items()})
    assert temp[4] < logits / 4 and temp[0] > logits, (temp, logits)


@pytest.mark.slow  # 3 JAX processes, 3 short runs: 96 s to 3.5 min on 2 shared cores
def test_rl_on_two_processes_matches_one(tmp_path):
    """task=rl on 2 processes (1 device each) against 1 process with both devices: each
    process samples its half of the prompts, yet every step's rewards, the evaluation and the
    trained parameters are those of one process."""
    import socket

    from t5x_like.core import metrics as metrics_lib
    from t5x_like.core import runs
    from test_scale import env

    script = RL_PROCESS.format(root=ROOT)
    one = subprocess.run([sys.executable, "-c", script, str(tmp_path), "one", "0", "1", "0"],
                         cwd=ROOT, env=env(2), capture_output=True, text=True, timeout=900)
    assert one.returncode == 0, one.stderr[-3000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), "two", port, "2",
                               str(i)], cwd=ROOT, env=env(1), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]

    def lines(workdir, split):
        return {r["step"]: r for r in metrics_lib.read_metrics(str(workdir))
                if r["split"] == split}

    want, got = lines(tmp_path / "one", "train"), lines(tmp_path / "two", "train")
    assert sorted(want) == sorted(got) == [1, 2, 3]
    assert max(want[s]["reward_std_in_group"] for s in want) > 0  # something to learn from
    for s in want:
        for k in ("reward", "reward_std_in_group", "reply_length", "loss", "kl", "grad_norm"):
            assert got[s][k] == pytest.approx(want[s][k], rel=1e-5, abs=1e-7), (s, k)
    assert lines(tmp_path / "two", "validation")[3]["reward"] == pytest.approx(
        lines(tmp_path / "one", "validation")[3]["reward"])
    a, b = runs.load(str(tmp_path / "one")).params, runs.load(str(tmp_path / "two")).params
    assert_trees_close(a, b)
    start = runs.load(str(tmp_path / "pre")).params
    assert max(float(np.abs(x - y).max()) for x, y in zip(
        jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(start)))) > 1e-4


# One process of the RL comparison: argv = root run port num_processes index. Run "one"
# pretrains root/pre first (2 steps); both then train task=rl from it into root/<run>. The
# reward is the reply length mod 3 (an untrained model never answers the arithmetic, so
# exact_answer would give every reply 0 and nothing to learn).
RL_PROCESS = """
import sys
sys.path.insert(0, {root!r})
import jax
import numpy as np
root, run, port, count, index = sys.argv[1:]
if int(count) > 1:
    jax.distributed.initialize(f"127.0.0.1:{{port}}", int(count), int(index))
from configs import base
from t5x_like.training import rl, trainer

rl.exact_answer_reward = lambda prompts, replies: np.array(
    [len(r) % 3 / 2 for r in replies], np.float32)
cfg = base.get_config()
cfg.model.update(hidden_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                 max_len=32)
cfg.data.update(batch_size=4, synthetic_docs=200, vocab_size=300, cache_dir=root + "/cache")
cfg.data.num_shards = 2  # the same data order on 1 and 2 processes
cfg.eval.update(every_steps=0, steps=1, batch_size=4)
cfg.mesh.data = 2
cfg.log_every_steps = 1
if run == "one":
    pre = cfg.copy_and_resolve_references()
    pre.steps, pre.checkpoint.every_steps = 2, 2
    trainer.train_and_evaluate(pre, root + "/pre")
cfg.task, cfg.init_from, cfg.model_from_init = "rl", root + "/pre", True
cfg.data.update(source="synthetic:arithmetic_chat", cache_dir="", synthetic_docs=80)
cfg.steps, cfg.checkpoint.every_steps = 3, 3
cfg.optimizer.update(warmup_steps=0, lr=1e-2)
cfg.rl.update(group_size=4, max_new_tokens=6, eval_prompts=6, temperature=1.0)
trainer.train_and_evaluate(cfg, root + "/" + run)
"""


def _library_modules(package: str) -> dict[str, ast.Module]:
    root = pathlib.Path(ROOT)
    return {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"):
            ast.parse(p.read_text()) for p in (root / package.replace(".", "/")).rglob("*.py")}


def _imports(tree: ast.Module, modules) -> list[tuple[str, str | None]]:
    """(module imported, the private name imported from it or None), anywhere in the file."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import"
            for a in node.names:
                full = f"{node.module}.{a.name}"
                out.append((full, None) if full in modules else
                           (node.module, a.name if a.name.startswith("_") else None))
    return out


def test_training_modules_share_no_private_names_and_no_import_cycle():
    modules = _library_modules("t5x_like.training")
    graph = {}
    for name, tree in modules.items():
        graph[name] = set()
        for target, private in _imports(tree, modules):
            assert private is None, f"{name} imports {private} from {target}"
            if target in modules and target != name:
                graph[name].add(target)
        # module._private attribute access on an imported training module
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                for a in node.names:
                    if f"{node.module}.{a.name}" in modules:
                        aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and node.attr.startswith("_")):
                raise AssertionError(f"{name} uses {aliases[node.value.id]}.{node.attr}")
    assert "t5x_like.training.alignment" not in modules

    def visit(node, path):
        for nxt in graph[node]:
            assert nxt not in path, "import cycle: " + " -> ".join([*path, nxt])
            visit(nxt, (*path, nxt))
    for name in graph:
        visit(name, (name,))
