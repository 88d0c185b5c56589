"""Write the Flax fixture of tests/test_convert.py with the paper's own JAX model code.

Not part of the test run. Needs a separate environment with jax, flax and ml_collections (no
torch) and an exported copy of yang-song/score_flow:

    python make_flax_fixture.py /path/to/score_flow tests/data/convert

It builds score_flow's Flax NCSNpp (DDPM++: BigGAN blocks, positional embedding) at a tiny
width, perturbs its initial weights, evaluates it on fixed inputs and writes

- ``flax_ncsnpp_tiny.msgpack``: ``flax.serialization.to_bytes`` of a training state laid out
  like the reference's (step, optimizer.target, params_ema, ema_rate, ...);
- ``flax_ncsnpp_tiny_io.npz``: the inputs ``x`` (NHWC), ``t`` (labels 999 t) and the outputs
  ``y`` (NHWC) of ``params`` and ``y_ema`` of ``params_ema``.

Only the placeholder modules below are ours; the network is the reference's.
"""

import sys
import types
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import serialization

# score_flow's models/utils.py imports these at module level; the network does not use them
flax.optim = types.SimpleNamespace(Optimizer=object)
for name in ("datasets", "sde_lib", "utils"):
    sys.modules[name] = types.ModuleType(name)
sys.modules["utils"].batch_mul = None


def tiny_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.training = dict(continuous=True, sde="vpsde")
    config.data = dict(centered=True, image_size=8, num_channels=3)
    config.model = dict(
        name="ncsnpp",
        nf=4,
        ch_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(4,),
        dropout=0.0,
        resamp_with_conv=True,
        conditional=True,
        fir=False,
        fir_kernel=[1, 3, 3, 1],
        skip_rescale=True,
        resblock_type="biggan",
        progressive="none",
        progressive_input="none",
        progressive_combine="sum",
        embedding_type="positional",
        init_scale=0.0,
        fourier_scale=16,
        nonlinearity="swish",
        sigma_min=0.01,
        sigma_max=50,
        num_scales=1000,
        scale_by_sigma=False,
        trainable_embedding=False,
    )
    return config


def perturbed(params, seed):
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    leaves = [p + 0.3 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)]
    return jax.tree_util.tree_unflatten(tree, leaves)


def main(reference: str, out: str) -> None:
    sys.path.insert(0, reference)
    from models import ncsnpp

    model = ncsnpp.NCSNpp(config=tiny_config())
    x = np.random.default_rng(0).standard_normal((3, 8, 8, 3)).astype(np.float32)
    t = np.array([3.0, 400.0, 990.0], np.float32)
    rng = jax.random.PRNGKey(0)
    params = model.init({"params": rng, "dropout": rng}, jnp.asarray(x), jnp.asarray(t))["params"]
    params, params_ema = perturbed(params, 1), perturbed(params, 2)
    y = model.apply({"params": params}, x, t, train=False)
    y_ema = model.apply({"params": params_ema}, x, t, train=False)
    state = {
        "step": 1300000,
        "optimizer": {"target": params, "state": {"step": 1300000}},
        "lr": 2e-4,
        "model_state": {},
        "ema_rate": 0.9999,
        "params_ema": params_ema,
        "rng": jax.random.PRNGKey(5),
    }
    out = Path(out)
    (out / "flax_ncsnpp_tiny.msgpack").write_bytes(serialization.to_bytes(state))
    np.savez(out / "flax_ncsnpp_tiny_io.npz", x=x, t=t, y=np.asarray(y), y_ema=np.asarray(y_ema))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
