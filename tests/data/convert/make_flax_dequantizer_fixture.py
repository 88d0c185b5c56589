"""Write the Flax Flow++ fixtures of tests/test_convert.py with the paper's own JAX model code.

Not part of the test run. Needs a separate environment with jax and flax (no torch; seen to work
with jax 0.10.2 and flax 0.12.8) and an exported copy of yang-song/score_flow:

    python make_flax_dequantizer_fixture.py /path/to/score_flow tests/data/convert

For each of score_flow's two dequantisers (``models/flowpp/dequantization_cifar10.py`` and
``dequantization_imagenet32.py``) at a tiny width on 8x8 RGB images, it initialises the network
the way the reference does (data-dependent, under ``jax.pmap`` with the axis "batch"), perturbs
the weights so that no layer sits at its initial value, runs the forward flow on fixed inputs
and writes

- ``flax_flowpp_<arch>_tiny.msgpack``: ``flax.serialization.to_bytes`` of a dequantiser training
  state laid out like the reference's (step, optimizer.target, params_ema, ema_rate, ...);
- ``flax_flowpp_<arch>_tiny_io.npz``: the inputs ``eps`` (Gaussian noise, NHWC) and ``x``
  (images in [0, 1], NHWC), and the outputs of ``params``: ``u`` (NHWC) and ``minus_log_q``,
  the network's second output, which the reference's loss subtracts, i.e. -log q(u | x) in
  nats; ``u_ema`` and ``minus_log_q_ema`` of ``params_ema``.

Only the two shims below are ours; the networks are the reference's.
"""

import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import jax_utils, serialization

# score_flow's couplings print statistics at initialisation through
# jax.experimental.host_callback.id_tap, since removed from JAX: an identity here
host_callback = types.ModuleType("host_callback")
host_callback.id_tap = lambda tap_func, x: x
sys.modules["jax.experimental.host_callback"] = host_callback
# and they call jnp.clip with the keywords a_min / a_max, which JAX has renamed min / max
_clip = jnp.clip
jnp.clip = lambda x, a_min=None, a_max=None, **kw: _clip(x, min=a_min, max=a_max, **kw)

WIDTHS = {
    # the cifar10 layout: 4 x [actnorm, 1x1 conv, coupling, flip], shallow context network
    "cifar10": dict(filters=8, components=2, blocks=2, attn_heads=2),
    # the imagenet32 layout: 8 x [actnorm, coupling, flip], deep context network (fixed width)
    "imagenet32": dict(filters=8, components=2, blocks=1, attn_heads=2),
}


def perturbed(params, seed: int, scale: float = 0.05):
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    leaves = [p + scale * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)]
    return jax.tree_util.tree_unflatten(tree, leaves)


def write_fixture(arch: str, out: Path) -> None:
    if arch == "cifar10":
        from models.flowpp import dequantization_cifar10 as module
    else:
        from models.flowpp import dequantization_imagenet32 as module
    model = module.Dequantization(**WIDTHS[arch])

    rng = np.random.default_rng(0)
    x = (rng.integers(0, 256, size=(8, 8, 8, 3)) / 255.0).astype(np.float32)
    eps = rng.standard_normal((8, 8, 8, 3)).astype(np.float32)

    # the reference's data-dependent initialisation: one device, the batch axis named "batch"
    def init(params_rng, dropout_rng, noise, data):
        rngs = {"params": params_rng, "dropout": dropout_rng}
        return model.init(rngs, noise, data, inverse=False, train=False)

    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    variables = jax.pmap(init, axis_name="batch")(
        keys[:1], keys[1:], jnp.asarray(eps)[None], jnp.asarray(x)[None]
    )
    params = jax_utils.unreplicate(variables)["params"]
    params, params_ema = perturbed(params, 1), perturbed(params, 2)

    # evaluation as in the reference, under jax.pmap too (flax checks the shapes of given
    # parameters against their data-dependent initialisers, which need the "batch" axis)
    def apply(weights, noise, data):
        return model.apply({"params": weights}, noise, data, inverse=False, train=False)

    outputs = {}
    for suffix, weights in (("", params), ("_ema", params_ema)):
        u, minus_log_q = jax.pmap(apply, axis_name="batch")(
            jax_utils.replicate(weights), jnp.asarray(eps)[None], jnp.asarray(x)[None]
        )
        outputs[f"u{suffix}"] = np.asarray(u[0])
        outputs[f"minus_log_q{suffix}"] = np.asarray(minus_log_q[0])
        assert np.all(np.isfinite(outputs[f"minus_log_q{suffix}"]))

    state = {
        "step": 60000,
        "optimizer": {"target": params, "state": {"step": 60000}},
        "lr": 2e-4,
        "ema_rate": 0.99,
        "params_ema": params_ema,
        "ema_train_bpd": 0.0,
        "ema_eval_bpd": 0.0,
        "rng": jax.random.PRNGKey(5),
    }
    (out / f"flax_flowpp_{arch}_tiny.msgpack").write_bytes(serialization.to_bytes(state))
    np.savez(out / f"flax_flowpp_{arch}_tiny_io.npz", eps=eps, x=x, **outputs)


def main(reference: str, out: str) -> None:
    sys.path.insert(0, reference)
    for arch in WIDTHS:
        write_fixture(arch, Path(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
