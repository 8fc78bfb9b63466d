"""Equivariant layers of PhiSNet on per-order feature arrays.

Features of an atom (or atom pair) are arrays of shape (..., (L+1)^2, F): F channels, each an
e3nn IrrepsArray of irreps ``0e + 1e + ... + Le`` (components of order l at l^2 ... (l+1)^2 - 1
of the second-last axis, ``order_parts``; e3nn's real-harmonic basis). Channels come
last so that the channel mixing of each order and the weighted sums over paths act on the
minor axis without transposes. As in the paper, the network is SO(3)-equivariant: every order
carries the label 'e', so every Clebsch-Gordan path l1 x l2 -> L is allowed, and features
transform under a rotation R as ``D_l(R)`` for each order.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def order_parts(x: jnp.ndarray, max_order: int, axis: int = -2) -> list[jnp.ndarray]:
    """The components of each order l <= max_order of x, split along ``axis`` in one operation.

    One split, not a slice per order: the gradient of a split is one concatenation, that of
    each slice a full-size padding of its own (a kernel per slice and use)."""
    return jnp.split(x, [l * l for l in range(1, max_order + 1)], axis=axis)


def rows(w: jnp.ndarray) -> list[jnp.ndarray]:
    """w[0], w[1], ... in one split (whose gradient is one concatenation, not a padding per row)."""
    return [jnp.squeeze(row, 0) for row in jnp.split(w, w.shape[0])]


def component_orders(max_order: int) -> np.ndarray:
    """The order l of each of the (max_order+1)^2 components: [0, 1, 1, 1, 2, ...]."""
    return np.repeat(np.arange(max_order + 1), 2 * np.arange(max_order + 1) + 1)


def irreps_string(max_order: int) -> str:
    """e3nn irreps of one channel, e.g. '0e+1e+2e' for max_order 2."""
    return "+".join(f"{l}e" for l in range(max_order + 1))


def cg_paths(max_order: int, strictly_increasing: bool = False) -> tuple[tuple[int, int, int], ...]:
    """All (l1, l2, L) with |l1 - l2| <= L <= l1 + l2 and every order <= max_order.

    ``strictly_increasing`` keeps only l1 < l2 (the self-mixing layer's products).
    """
    paths = []
    for l1 in range(max_order + 1):
        for l2 in range(max_order + 1):
            if strictly_increasing and not l1 < l2:
                continue
            for L in range(abs(l1 - l2), min(l1 + l2, max_order) + 1):
                paths.append((l1, l2, L))
    return tuple(paths)


@functools.lru_cache(maxsize=None)
def _cg(l1: int, l2: int, L: int) -> np.ndarray:
    import e3nn_jax as e3nn

    # e3nn's coefficients have unit Frobenius norm; sqrt(2L+1) makes products of unit-size
    # inputs unit-size outputs.
    return np.sqrt(2 * L + 1) * np.asarray(e3nn.clebsch_gordan(l1, l2, L), dtype=np.float64)


def _group_by_input_orders(paths):
    groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for p, (l1, l2, L) in enumerate(paths):
        groups.setdefault((l1, l2), []).append((p, L))
    return groups


def paths_by_output_order(paths, max_order: int) -> tuple[np.ndarray, ...]:
    """For each output order L <= max_order, the indices of the paths l1 x l2 -> L in ``paths``."""
    return tuple(np.array([p for p, (_, _, out) in enumerate(paths) if out == L], dtype=np.int32)
                 for L in range(max_order + 1))


def weighted_cg_product(
    x: jnp.ndarray, y: jnp.ndarray, paths, weights, subscripts: str, max_order: int
) -> jnp.ndarray:
    """Sum over paths of ``weights[..., path, f] * CG(x^l1, y^l2)^L``, channel by channel.

    ``subscripts`` describes how x and y broadcast to the output, in the form 'X,Y->O' with
    the component letters 'a' (x), 'b' (y) and 'c' (output) and the channel letter 'f', e.g.
    'iaf,jbf->ijcf' for all atom pairs (i, j) (y may lack channels: 'jaf,ijb->ijcf'); the
    output must end in 'cf'. ``weights[L]`` holds the weights of the paths with output order L
    (``paths_by_output_order``), shape (..., P_L, F) with the output's leading shape (or one
    that broadcasts to it). Returns (..., (max_order+1)^2, F).

    The weights come per output order, not as one (..., n_paths, F) array, because the
    gradient of one array sliced path by path is a full-size array per path: with 5 modules
    at order 4 that assembly took more than half of a training step.
    """
    in_x, rest = subscripts.split(",")
    in_y, out = rest.split("->")
    x_parts = order_parts(x, max_order)
    # y's components are on its last axis when it has no channels.
    y_parts = order_parts(y, max_order, axis=-1 if in_y.endswith("b") else -2)
    parts: dict[int, jnp.ndarray] = {}  # path -> its product (..., 2L+1, F)
    for (l1, l2), entries in _group_by_input_orders(paths).items():
        cg = np.concatenate([_cg(l1, l2, L) for _, L in entries], axis=-1)
        product = jnp.einsum(f"{in_x},{in_y},abc->{out}", x_parts[l1], y_parts[l2], jnp.asarray(cg, x.dtype))
        start = 0
        for p, L in entries:
            parts[p] = product[..., start : start + 2 * L + 1, :]
            start += 2 * L + 1
    outputs = []
    for L, indices in enumerate(paths_by_output_order(paths, max_order)):
        if len(indices) == 0:
            outputs.append(None)
            continue
        stacked = jnp.stack([parts[p] for p in indices], axis=-3)  # (..., P_L, 2L+1, F)
        outputs.append(jnp.sum(weights[L][..., None, :] * stacked, axis=-3))
    lead = jnp.broadcast_shapes(*(o.shape[:-2] for o in outputs if o is not None))
    F = x.shape[-1]
    return jnp.concatenate(
        [jnp.broadcast_to(o, lead + (2 * L + 1, F)) if o is not None
         else jnp.zeros(lead + (2 * L + 1, F), x.dtype) for L, o in enumerate(outputs)],
        axis=-2,
    )


class PerOrderLinear(nn.Module):
    """Channel mixing with separate weights per order; a bias on the scalars (L = 0) only.

    The weights of all orders are one parameter, (L+1, F_in, F), not one per order: XLA
    compiles every parameter array's initialisation and optimiser update into kernels of its
    own: with an array per order (and ScalarSwish's and SelfMixing's weights in two arrays each)
    PhiSNet's small preset took 21.9 s instead of 6.5 s to initialise a training state
    (experiments/results/phisnet_compile_cpu.json)."""

    features: int
    max_order: int
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        f_in = x.shape[-1]
        init = nn.initializers.normal(stddev=1.0 / np.sqrt(f_in))
        w = self.param("weight", init, (self.max_order + 1, f_in, self.features), x.dtype)
        y = jnp.concatenate([x_l @ w_l for x_l, w_l in zip(order_parts(x, self.max_order), rows(w))], axis=-2)
        if self.use_bias:
            b = self.param("bias", nn.initializers.zeros, (self.features,), x.dtype)
            y = y.at[..., 0, :].add(b)
        return y


def _swish_init(key, shape, dtype):
    del key
    return jnp.stack([jnp.ones(shape[1:], dtype), jnp.full(shape[1:], 1.702, dtype)])


class ScalarSwish(nn.Module):
    """Learnable swish a * x * sigmoid(b * x) on the L = 0 components; higher orders unchanged.

    a and b (a = 1, b = 1.702 at first) are the rows of one (2, F) parameter: one array, as in
    PerOrderLinear."""

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        F = x.shape[-1]
        a, b = rows(self.param("swish", _swish_init, (2, F), x.dtype))
        s = x[..., 0, :]
        return x.at[..., 0, :].set(a * s * jax.nn.sigmoid(b * s))


class SelfMixing(nn.Module):
    """s(x)^L = k^L * x^L + sum_{l1 < l2} s^{l1 l2 L} * CG(x^l1, x^l2)^L, weights per channel.

    One (L+1 + n_paths, F) parameter: the k^L (1 at first), then the s of each path of
    ``cg_paths(L, strictly_increasing=True)`` (normal, standard deviation 0.1, at first)."""

    max_order: int

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        F = x.shape[-1]
        paths = cg_paths(self.max_order, strictly_increasing=True)
        n_keep = self.max_order + 1

        def init(key, shape, dtype):
            mix = nn.initializers.normal(0.1)(key, (shape[0] - n_keep,) + shape[1:], dtype)
            return jnp.concatenate([jnp.ones((n_keep,) + shape[1:], dtype), mix])

        keep, mix = jnp.split(self.param("weights", init, (n_keep + len(paths), F), x.dtype), [n_keep])
        out = keep[component_orders(self.max_order)] * x
        if paths:
            mix_by_order = [mix[indices] for indices in paths_by_output_order(paths, self.max_order)]
            out = out + weighted_cg_product(x, x, paths, mix_by_order, "...af,...bf->...cf", self.max_order)
        return out


class RadialPathWeights(nn.Module):
    """Per-path, per-channel weights as a linear map of a radial basis (..., K): for each output
    order L, (..., P_L, F) for the paths l1 x l2 -> L (``paths_by_output_order``)."""

    paths: tuple[tuple[int, int, int], ...]
    max_order: int
    features: int

    @nn.compact
    def __call__(self, radial: jnp.ndarray) -> list[jnp.ndarray]:
        K = radial.shape[-1]
        w = self.param(
            "weight", nn.initializers.normal(1.0 / np.sqrt(K)), (K, len(self.paths), self.features),
            radial.dtype,
        )
        return [jnp.einsum("...k,kpf->...pf", radial, w[:, indices])
                for indices in paths_by_output_order(self.paths, self.max_order)]
