"""The transferable neural wavefunction (after Scherbela, Gerard and Grohs 2023).

One set of parameters describes any molecule: the molecule enters only through its nuclei and
its occupied Hartree-Fock (or predicted) orbitals, never through parameter shapes. For spin
sigma with orbitals k = 1..n_sigma and determinants d = 1..n_det,

    phi_k^d(r_i) = sum_I exp(-alpha_Ikd^t |r_i - R_I|) <h_iI, f_Ikd^t>,

with t = same / opposite spin of electron i relative to orbital k, ``h`` the electron
embedding and ``f`` the backflow of orbital k on atom I. The N x N matrix [phi_k^d(r_i)] over
all electrons and all orbitals (spin-up orbitals first) is one full determinant per d;
psi = exp(J) * sum_d det_d, summed in log space with signs, and J an optional
electron-electron cusp Jastrow factor.

Pipeline, per orbital k:

1. **Orbital features** (``molfoundation.orbital_features``): the AO coefficients of orbital k on
   each atom, as e3nn irreps in element-independent slots (``2x0e+1x1o`` for a minimal basis).
2. **Orbital GNN** over atoms (``gnn_iterations`` rounds, 2 in the reference): E(3)-equivariant
   message passing. Node features start from the orbital features and a learned embedding of
   Z; messages couple neighbour features with the spherical harmonics (l <= 2) of the
   inter-atomic direction along every Clebsch-Gordan path into ``0e`` and ``1o``, weighted by
   learned functions of the distance. The output per (atom, orbital) has invariant scalars
   (``0e``) and equivariant vectors (``1o``).
3. **Heads**, symmetrised in the orbital's sign: the GNN and head run on the features x and on
   -x. The exponent head is even, f(x) + f(-x), so alpha_Ikd > 0 does not change when an
   orbital's sign does; the backflow head is odd, f(x) - f(-x), so flipping orbital k flips
   column k of every determinant and leaves |psi| unchanged.

**How rotation invariance is achieved.** The orbital features rotate with the molecule by the
Wigner D of their irreps, and every operation of steps 2-3 is equivariant, so scalar outputs
are invariant and vector outputs rotate. The electron embedding uses only distances
(electron-electron and electron-nucleus), so ``h_i`` is invariant. The inner product
<h_iI, f_Ikd> has an invariant part h_i . f^s_Ikd (the reference's formula) and, with
``backflow_vectors > 0``, an equivariant part sum_c b_iIc (r_i - R_I) . v_Ikdc, which pairs
the electron's direction from nucleus I with vectors computed from the orbital's own p
coefficients. Each term is a dot product of two vectors that rotate together, hence |psi| is
invariant under any rotation (and reflection) of electrons and nuclei together, given orbitals
recomputed at the rotated geometry. The vector part matters: without it the only directional
information an orbital has is the electrons' distances to the nuclei and to each other, so a
p orbital of an atom, a pi orbital of a linear molecule or the out-of-plane lone pair of water
is not a one-electron function of the ansatz (its sign change across the nodal plane would
have to be reconstructed from the positions of the other electrons), and supervised
pretraining to such HF orbitals could not succeed.

Electrons are ordered spin-up first; either spin channel may be empty (e.g. the H atom) and
one-electron channels are handled without special cases (no NaN).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from molfoundation.basis import AOLayout
from molfoundation.errors import InputError
from molfoundation.orbital_features import MINIMAL_BASIS_SLOTS, FeatureSlots, orbital_features

Params = Any

# Messages are summed over neighbours within the cutoff and divided by the square root of this
# typical neighbour count, a constant so that nothing depends on the size of the molecule.
TYPICAL_NEIGHBOURS = 4.0


@dataclasses.dataclass(frozen=True)
class AnsatzConfig:
    """Hyperparameters; the defaults follow the reference base model where it states them.

    Attributes:
      n_determinants: full determinants summed (reference: 4).
      embedding_layers: layers of the electron embedding (reference: 4).
      one_electron_width, pair_width: widths of the one-electron and pair streams (256 / 32).
      element_embedding_dim: size of the learned embedding of Z (nuclei in the electron
        embedding and atoms in the orbital GNN).
      max_atomic_number: largest Z the element embedding has a row for.
      gnn_iterations: message-passing rounds of the orbital GNN (reference: 2).
      gnn_scalars, gnn_vectors: channels of 0e and 1o hidden features of the orbital GNN.
      gnn_radial_basis: radial basis functions of inter-atomic distances.
      gnn_cutoff: bohr; atoms further apart exchange no messages.
      head_width, head_depth: hidden layers of the exponent and backflow MLPs.
      backflow_vectors: equivariant (1o) backflow channels per (atom, orbital, determinant);
        0 keeps only the invariant h_i . f part.
      jastrow: add the electron-electron cusp Jastrow factor.
      slots: per-atom orbital-feature layout (must match the orbitals' basis).
    """

    n_determinants: int = 4
    embedding_layers: int = 4
    one_electron_width: int = 256
    pair_width: int = 32
    element_embedding_dim: int = 32
    max_atomic_number: int = 36
    gnn_iterations: int = 2
    gnn_scalars: int = 64
    gnn_vectors: int = 16
    gnn_radial_basis: int = 16
    gnn_cutoff: float = 10.0
    head_width: int = 64
    head_depth: int = 2
    backflow_vectors: int = 8
    jastrow: bool = True
    slots: FeatureSlots = MINIMAL_BASIS_SLOTS

    def __post_init__(self):
        if self.slots.max_l > 1:
            raise ValueError(
                "the orbital GNN handles s and p slots (0e, 1o) only; got slots "
                f"{self.slots.channels} with l up to {self.slots.max_l}"
            )
        if self.n_determinants < 1 or self.embedding_layers < 1:
            raise ValueError("n_determinants and embedding_layers must be at least 1")


def small_config(**overrides) -> AnsatzConfig:
    """A small network for tests and quick experiments."""
    settings = dict(
        n_determinants=2, embedding_layers=2, one_electron_width=16, pair_width=8,
        element_embedding_dim=8, gnn_scalars=8, gnn_vectors=4, gnn_radial_basis=8,
        head_width=16, head_depth=1, backflow_vectors=2,
    )
    settings.update(overrides)
    return AnsatzConfig(**settings)


@flax.struct.dataclass
class AnsatzInputs:
    """Everything molecule-specific the wavefunction reads; a pytree, so it may be an
    argument of jitted functions (one compilation per shape).

    Attributes:
      atom_positions: (n_atoms, 3) bohr.
      atomic_numbers: (n_atoms,) int32.
      features_up: (n_up, n_atoms, slots.dim) orbital features of the spin-up orbitals
        (e3nn components of ``slots.irreps``).
      features_down: (n_down, n_atoms, slots.dim) the same for the spin-down orbitals.
    """

    atom_positions: jax.Array
    atomic_numbers: jax.Array
    features_up: jax.Array
    features_down: jax.Array

    @property
    def n_up(self) -> int:
        return self.features_up.shape[0]

    @property
    def n_down(self) -> int:
        return self.features_down.shape[0]


def make_inputs(
    atom_positions,
    atomic_numbers,
    coefficients_up,
    coefficients_down,
    layout: AOLayout,
    config: AnsatzConfig,
) -> AnsatzInputs:
    """Inputs from orbitals of any source, given as AO coefficients (n_ao, n_sigma) in pyscf
    order for each spin, and the AO layout. Raises InputError for elements beyond the
    embedding or shells beyond the feature slots."""
    numbers = np.asarray(atomic_numbers)
    if numbers.max() > config.max_atomic_number:
        raise InputError(
            f"element Z = {int(numbers.max())} is beyond this model's elements "
            f"(max_atomic_number = {config.max_atomic_number})"
        )
    up = orbital_features(jnp.asarray(coefficients_up), layout, config.slots, numbers)
    down = orbital_features(jnp.asarray(coefficients_down), layout, config.slots, numbers)
    return AnsatzInputs(
        atom_positions=jnp.asarray(atom_positions, up.dtype),
        atomic_numbers=jnp.asarray(numbers, jnp.int32),
        features_up=up.array,
        features_down=down.array,
    )


def inputs_from_hartree_fock(orbitals, config: AnsatzConfig) -> AnsatzInputs:
    """Inputs from :func:`vmc.orbitals.hartree_fock` orbitals."""
    return make_inputs(orbitals.atom_positions, orbitals.atomic_numbers, orbitals.up,
                       orbitals.down, orbitals.layout, config)


class Dense(nn.Module):
    """``x @ kernel + bias`` over the last axis of x (..., n_in) -> (..., features); the
    parameters and their initialisers are flax's ``nn.Dense``'s.

    The bias is added by broadcasting rather than reshaped first, as flax does: under ``vmap``
    over walkers, kfac-jax's graph matcher recognises this form as one dense layer with bias
    (one Kronecker-factored block for kernel and bias together), where flax's form leaves the
    bias a diagonal block of its own.
    """

    features: int
    use_bias: bool = True

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
        y = jnp.dot(x, kernel.astype(x.dtype))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(x.dtype)
        return y


# ----------------------------------------------------------------------------------------------
# Orbital side: GNN over atoms and the symmetrised heads.


class MLP(nn.Module):
    """Dense layers with SiLU between them (none after the last)."""

    widths: tuple[int, ...]

    @nn.compact
    def __call__(self, x):
        for i, width in enumerate(self.widths):
            x = Dense(width)(x)
            if i < len(self.widths) - 1:
                x = nn.silu(x)
        return x


def _split_irreps(features, slots: FeatureSlots):
    """Orbital features (..., slots.dim) of irreps ``n0x0e + n1x1o`` -> scalars (..., n0) and
    Cartesian vectors (..., n1, 3) (e3nn's 1o components are (x, y, z))."""
    import e3nn_jax as e3nn

    x = e3nn.IrrepsArray(slots.irreps, features)
    return x.filter(keep="0e").array, x.filter(keep="1o").mul_to_axis().array


def _mix_vectors(vectors, n_out: int, name: str, module: nn.Module):
    """Channel mixing of vectors (..., c, 3) -> (..., n_out, 3): the only linear map between
    1o features that commutes with rotations (Schur); no bias, which would not rotate."""
    w = module.param(name, nn.initializers.lecun_normal(), (vectors.shape[-2], n_out))
    return jnp.einsum("...cx,cd->...dx", vectors, w.astype(vectors.dtype))


class OrbitalGNN(nn.Module):
    """E(3)-equivariant message passing over the atoms, for each orbital separately.

    Features are ``gnn_scalars x 0e + gnn_vectors x 1o``, held as scalars s (..., ns) and
    Cartesian vectors v (..., nv, 3); with x -> x @ R.T the vectors rotate as v @ R.T and the
    scalars stay. A message from atom J to atom I, with unit vector u = (R_J - R_I) / |.|,
    combines the Clebsch-Gordan paths of (0e + 1o) x (0e + 1o + 2e) that end in 0e or 1o:
    s_J and v_J . u (scalars); s_J u, v_J and u (u . v_J) (vectors, the last the 1o x 2e path
    up to a multiple of v_J); each path channel is weighted by a learned function of |R_J - R_I|
    that goes smoothly to zero at ``gnn_cutoff``. Written out by hand rather than with generic
    tensor products: the same maps, with a graph several times smaller to compile.

    Input: orbital features (n_orb, n_atoms, slots.dim); atom positions (n_atoms, 3) bohr;
    element embeddings (n_atoms, E). Output: scalars (n_orb, n_atoms, ns) and vectors
    (n_orb, n_atoms, nv, 3).
    """

    config: AnsatzConfig

    @nn.compact
    def __call__(self, features, atom_positions, elements):
        import e3nn_jax as e3nn

        cfg = self.config
        ns, nv = cfg.gnn_scalars, cfg.gnn_vectors
        n_orb, n_atoms = features.shape[:2]
        x_scalars, x_vectors = _split_irreps(features, cfg.slots)
        element_scalars = jnp.broadcast_to(elements, (n_orb,) + elements.shape)
        element_scalars = element_scalars.astype(features.dtype)
        s = Dense(ns, name="embed_scalars")(jnp.concatenate([x_scalars, element_scalars], -1))
        v = _mix_vectors(x_vectors, nv, "embed_vectors", self)

        # Geometry of all ordered atom pairs (I receives from J). The diagonal gets a dummy
        # vector, so no zero-length vector is normalised, and a zero weight.
        eye = jnp.eye(n_atoms, dtype=features.dtype)
        diff = atom_positions[None, :, :] - atom_positions[:, None, :] + eye[..., None]
        distance = jnp.linalg.norm(diff, axis=-1)
        u = diff / distance[..., None]  # (I, J, 3)
        radial = e3nn.soft_one_hot_linspace(
            distance, start=0.0, end=cfg.gnn_cutoff, number=cfg.gnn_radial_basis,
            basis="smooth_finite", cutoff=True,
        )
        # Smooth decay to zero at the cutoff, and no self-messages.
        inside = distance < cfg.gnn_cutoff
        envelope = jnp.where(inside, (1 - (distance / cfg.gnn_cutoff) ** 2) ** 2, 0.0)
        envelope = envelope * (1.0 - eye) / np.sqrt(TYPICAL_NEIGHBOURS)

        for t in range(cfg.gnn_iterations):
            # Radial weights (I, J, paths) of every message path and channel.
            w = nn.silu(Dense(cfg.head_width, name=f"radial_{t}_hidden")(radial))
            w = Dense(ns + 4 * nv, use_bias=False, name=f"radial_{t}")(w) * envelope[..., None]
            w_ss, w_vs, w_sv, w_vv, w_vuu = jnp.split(w, np.cumsum([ns, nv, nv, nv]), axis=-1)
            s_to_v = Dense(nv, use_bias=False, name=f"scalars_to_vectors_{t}")(s)  # (o, J, nv)
            v_dot_u = jnp.einsum("oJcx,IJx->oIJc", v, u)
            msg_s = jnp.concatenate(
                [jnp.einsum("IJc,oJc->oIc", w_ss, s), jnp.einsum("IJc,oIJc->oIc", w_vs, v_dot_u)],
                axis=-1,
            )
            msg_v = jnp.concatenate(
                [jnp.einsum("IJc,oJc,IJx->oIcx", w_sv, s_to_v, u),
                 jnp.einsum("IJc,oJcx->oIcx", w_vv, v),
                 jnp.einsum("IJc,oIJc,IJx->oIcx", w_vuu, v_dot_u, u)],
                axis=-2,
            )
            update = Dense(ns + nv, name=f"update_{t}")(jnp.concatenate([s, msg_s], -1))
            s_update, gates = update[..., :ns], update[..., ns:]
            v_update = _mix_vectors(jnp.concatenate([v, msg_v], -2), nv,
                                    f"update_vectors_{t}", self)
            # Residual updates; vectors are gated by functions of scalars (equivariant).
            s = s + nn.silu(s_update)
            v = v + nn.sigmoid(gates)[..., None] * v_update
        return s, v


class OrbitalHeads(nn.Module):
    """Exponents (even) and backflows (odd) of every (orbital, atom) from orbital features.

    Returns, for orbital features (n_orb, n_atoms, dim):
      alpha: (n_orb, n_atoms, 2, n_det) positive exponents, 1/bohr; axis 2 is same / opposite
        spin of the electron relative to the orbital.
      scalars: (n_orb, n_atoms, 2, n_det, one_electron_width) invariant backflows f^s.
      vectors: (n_orb, n_atoms, 2, n_det, backflow_vectors, 3) equivariant backflows f^v.
    """

    config: AnsatzConfig

    @nn.compact
    def __call__(self, features, atom_positions, elements):
        cfg = self.config
        n_orb, n_atoms = features.shape[:2]
        n_det, width, n_vec = cfg.n_determinants, cfg.one_electron_width, cfg.backflow_vectors
        hidden = (cfg.head_width,) * cfg.head_depth

        # The networks run once on x and -x together (stacked along the orbital axis);
        # combining the halves makes the exponents exactly even and the backflows exactly odd
        # in each orbital's coefficients.
        s, v = OrbitalGNN(cfg, name="gnn")(
            jnp.concatenate([features, -features], axis=0), atom_positions, elements
        )
        exponent = MLP(hidden + (2 * n_det,), name="exponent")(s)
        scalars = MLP(hidden + (2 * n_det * width,), name="backflow")(s)
        plus, minus = slice(0, n_orb), slice(n_orb, 2 * n_orb)
        # softplus(. + 1) starts near 1.3 / bohr, a valence-like decay; pretraining adapts it.
        alpha = nn.softplus(exponent[plus] + exponent[minus] + 1.0)
        alpha = alpha.reshape(n_orb, n_atoms, 2, n_det)
        scalars = (scalars[plus] - scalars[minus]).reshape(n_orb, n_atoms, 2, n_det, width)
        if n_vec:
            gates = Dense(cfg.gnn_vectors, name="backflow_gates")(s)
            vectors = _mix_vectors(nn.sigmoid(gates)[..., None] * v, 2 * n_det * n_vec,
                                   "backflow_vectors", self)
            vectors = (vectors[plus] - vectors[minus]).reshape(n_orb, n_atoms, 2, n_det, n_vec, 3)
        else:
            vectors = jnp.zeros((n_orb, n_atoms, 2, n_det, 0, 3), features.dtype)
        return alpha, scalars, vectors


# ----------------------------------------------------------------------------------------------
# Electron side: FermiNet-like embedding on distances only.


def _spin_pool(x, n_up: int, axis: int):
    """Sums over the spin-up and spin-down slices along ``axis`` (zeros for an empty one)."""
    up = jax.lax.slice_in_dim(x, 0, n_up, axis=axis)
    down = jax.lax.slice_in_dim(x, n_up, x.shape[axis], axis=axis)

    def pool(part):
        if part.shape[axis] == 0:  # an empty spin channel contributes nothing (not 0/0)
            return jnp.zeros(np.delete(x.shape, axis), x.dtype)
        return jnp.sum(part, axis=axis)

    return pool(up), pool(down)


class DistanceEnvelope(nn.Module):
    """(..., width) weights exp(-a_c (sqrt(1 + d^2) - 1)) of distances d (...) in bohr: 1 where
    the particles meet, smooth there (even in d), decaying with a learnable rate a_c > 0 per
    channel (initially ``initial_decay`` / bohr)."""

    width: int
    initial_decay: float = 0.5

    @nn.compact
    def __call__(self, d):
        raw = self.param("decay", nn.initializers.constant(np.log(np.expm1(self.initial_decay))),
                         (self.width,))
        decay = nn.softplus(raw).astype(d.dtype)
        return jnp.exp(-decay * (jnp.sqrt(1.0 + d[..., None] ** 2) - 1.0))


def _distance_features(d):
    """(..., 2) features of distances d (bohr): one for range, one for short-range detail.

    With u = sqrt(1 + d^2), log u and exp(1 - u) (like log d and e exp(-d) far away): even in d
    and so differentiable where two particles meet, they add no cusp of their own; the cusps
    come from the Jastrow factor (electron-electron, exact) and the envelope exponents
    (electron-nucleus) alone.
    """
    u = jnp.sqrt(1.0 + d**2)
    return jnp.stack([jnp.log(u), jnp.exp(1.0 - u)], axis=-1)


class ElectronEmbedding(nn.Module):
    """One-electron stream h_i and pair streams g_ij (electron-electron) and g_iI
    (electron-nucleus), built on distances only, so every output is rotation-invariant.

    The initial one-electron feature is one learned vector shared by all electrons; the
    nuclei enter through the electron-nucleus stream (distances and the embedding of Z),
    summed over atoms; no parameter shape depends on the number of atoms.

    Each atom's electron-nucleus stream also sees the spin-pooled streams of all electrons at
    that atom, so an electron's embedding can tell whether others are near the same nucleus as
    it (summing over atoms alone cannot: for H2 it loses which nucleus each electron is near).

    Every sum or mean over atoms or other electrons is weighted by a smooth envelope
    exp(-a_c (sqrt(1 + d^2) - 1)) of the distance d, with a learnable decay a_c per channel
    (initially 0.5 / bohr): an electron's features then depend on its surroundings, not on how
    many atoms and electrons the molecule has further away, so a network trained on small
    molecules transfers to larger ones.

    Returns h: (n_el, one_electron_width) and g_en: (n_el, n_atoms, pair_width).
    """

    config: AnsatzConfig

    @nn.compact
    def __call__(self, electrons, atom_positions, elements, n_up: int):
        cfg = self.config
        n_el = electrons.shape[0]
        w1, w2 = cfg.one_electron_width, cfg.pair_width
        eye = jnp.eye(n_el, dtype=electrons.dtype)
        # Adding the identity keeps the norm's argument away from zero on the diagonal (its
        # derivative would be NaN there); the mask then sets those distances to exactly 0.
        d_ee = jnp.linalg.norm(electrons[:, None] - electrons[None] + eye[..., None], axis=-1)
        d_ee = d_ee * (1.0 - eye)
        d_en = jnp.linalg.norm(electrons[:, None] - atom_positions[None], axis=-1)
        spin = (jnp.arange(n_el) < n_up).astype(electrons.dtype)
        same_spin = (spin[:, None] == spin[None, :]).astype(electrons.dtype)

        ee_input = jnp.concatenate([_distance_features(d_ee), same_spin[..., None]], axis=-1)
        en_input = jnp.concatenate(
            [_distance_features(d_en),
             jnp.broadcast_to(elements[None], (n_el,) + elements.shape).astype(electrons.dtype)],
            axis=-1,
        )
        g_ee = jnp.tanh(Dense(w2, name="ee_input")(ee_input))
        g_en = jnp.tanh(Dense(w2, name="en_input")(en_input))
        h0 = self.param("initial_electron", nn.initializers.normal(1.0), (w1,))
        h = jnp.broadcast_to(h0.astype(electrons.dtype), (n_el, w1))

        en_weights = DistanceEnvelope(w2, name="en_envelope")(d_en)  # (i, I, w2)
        ee_weights = DistanceEnvelope(w2, name="ee_envelope")(d_ee)  # (i, j, w2)
        h_weights = DistanceEnvelope(w1, name="one_electron_envelope")(d_ee)  # (i, j, w1)

        def spin_pool(x, weights, axis):
            return _spin_pool(weights * x, n_up, axis=axis)

        for layer in range(cfg.embedding_layers):
            h_up, h_down = spin_pool(h[None], h_weights, 1)
            g_up, g_down = spin_pool(g_ee, ee_weights, 1)
            g_atoms = jnp.sum(en_weights * g_en, axis=1)
            f = jnp.concatenate([h, h_up, h_down, g_up, g_down, g_atoms], axis=-1)
            h = h + jnp.tanh(Dense(w1, name=f"one_electron_{layer}")(f))
            if layer < cfg.embedding_layers - 1:
                g_ee = g_ee + jnp.tanh(Dense(w2, name=f"ee_{layer}")(g_ee))
            # The electron-nucleus stream also sees the updated electron, so its output (which
            # weights the equivariant backflow) carries correlation as well as distance.
            en_update = Dense(w2, name=f"en_{layer}")(g_en) + Dense(
                w2, use_bias=False, name=f"en_from_electron_{layer}")(h)[:, None, :]
            at_atom = jnp.concatenate(spin_pool(g_en, en_weights, 0), axis=-1)  # (I, 2 w2)
            en_update = en_update + Dense(w2, use_bias=False, name=f"en_from_atom_{layer}")(at_atom)[None]
            g_en = g_en + jnp.tanh(en_update)
        return h, g_en


class CuspJastrow(nn.Module):
    """J = -sum_{i<j} c_ij beta^2 / (beta + r_ij), c = 1/4 (same spin) or 1/2 (opposite):
    dJ/dr = c at r = 0, Kato's electron-electron cusp; one learnable beta per spin pairing."""

    @nn.compact
    def __call__(self, electrons, n_up: int):
        n_el = electrons.shape[0]
        raw = self.param("beta", nn.initializers.constant(np.log(np.e - 1.0)), (2,))
        beta = nn.softplus(raw).astype(electrons.dtype)  # starts at 1 bohr
        i, j = np.triu_indices(n_el, k=1)
        if i.size == 0:
            return jnp.zeros((), electrons.dtype)
        # Only i < j pairs: no zero distance is ever passed to the norm.
        r = jnp.linalg.norm(electrons[i] - electrons[j], axis=-1)
        same = (i < n_up) == (j < n_up)
        c = np.where(same, 0.25, 0.5)
        b = jnp.where(same, beta[0], beta[1])
        return -jnp.sum(c * b**2 / (b + r))


# ----------------------------------------------------------------------------------------------
# The wavefunction.


def _signed_logsumexp(log_abs, signs):
    """log|sum_d s_d exp(l_d)| and its sign, stable for any spread of the l_d."""
    shift = jax.lax.stop_gradient(jnp.max(log_abs))
    total = jnp.sum(signs * jnp.exp(log_abs - shift))
    return jnp.sign(total), shift + jnp.log(jnp.abs(total))


@flax.struct.dataclass
class OrbitalParameters:
    """The electron-independent half of the wavefunction for one molecule.

    Attributes:
      alpha: (n_up + n_down, n_atoms, 2, n_det) envelope exponents, 1/bohr (axis 2: same /
        opposite spin of the electron relative to the orbital).
      scalars: (n_up + n_down, n_atoms, 2, n_det, one_electron_width) invariant backflows.
      vectors: (n_up + n_down, n_atoms, 2, n_det, backflow_vectors, 3) equivariant backflows.
      elements: (n_atoms, element_embedding_dim) embeddings of the nuclei.
    """

    alpha: jax.Array
    scalars: jax.Array
    vectors: jax.Array
    elements: jax.Array


class TransferableWavefunction(nn.Module):
    """``apply(params, electrons (n_el, 3) bohr, inputs) -> (sign, log|psi|)`` for one
    configuration; electrons spin-up first, n_up = inputs.n_up.

    Two methods split the work: :meth:`orbitals` (molecule only: GNN and heads) and
    :meth:`from_orbitals` (the electrons: embedding, orbitals, determinants, Jastrow).
    """

    config: AnsatzConfig

    def setup(self):
        cfg = self.config
        self.elements = nn.Embed(cfg.max_atomic_number + 1, cfg.element_embedding_dim)
        self.heads = OrbitalHeads(cfg)
        self.embedding = ElectronEmbedding(cfg)
        if cfg.backflow_vectors:
            self.electron_vectors = Dense(cfg.backflow_vectors)
        if cfg.jastrow:
            self.jastrow = CuspJastrow()

    def orbitals(self, inputs: AnsatzInputs) -> OrbitalParameters:
        """Exponents and backflows of every orbital (both spins through the same networks)."""
        elements = self.elements(inputs.atomic_numbers)
        features = jnp.concatenate([inputs.features_up, inputs.features_down], axis=0)
        dtype = inputs.atom_positions.dtype
        alpha, scalars, vectors = self.heads(features.astype(dtype), inputs.atom_positions,
                                             elements.astype(dtype))
        return OrbitalParameters(alpha, scalars, vectors, elements)

    def orbital_matrices(self, electrons, inputs: AnsatzInputs, orbitals: OrbitalParameters):
        """(n_det, n_el, n_el) neural orbitals phi_k^d(r_i): rows are electrons (spin-up
        first), columns orbitals (spin-up orbitals first). Supervised pretraining compares
        their spin-diagonal blocks with the HF orbitals."""
        cfg = self.config
        n_up, n_down = inputs.n_up, inputs.n_down
        n_el = n_up + n_down
        if electrons.shape != (n_el, 3):
            raise ValueError(f"electrons must have shape ({n_el}, 3), got {electrons.shape}")
        atom_positions = jnp.asarray(inputs.atom_positions, electrons.dtype)
        alpha, f_scalar, f_vector = orbitals.alpha, orbitals.scalars, orbitals.vectors

        h, g_en = self.embedding(electrons, atom_positions, orbitals.elements, n_up)
        r_en = electrons[:, None, :] - atom_positions[None]  # (n_el, n_atoms, 3)
        d_en = jnp.linalg.norm(r_en, axis=-1)
        if cfg.backflow_vectors:
            b = self.electron_vectors(g_en)  # (i, I, c)
            electron_vectors = b[..., None] * r_en[:, :, None, :]  # (i, I, c, 3)

        # The whole N x N matrix at once: each (electron i, orbital k) pair takes the heads'
        # same-spin (t = 0) or opposite-spin (t = 1) outputs, selected before the contractions
        # (a handful of operations instead of a set per spin block, which the Laplacian and
        # the gradients would multiply).
        spin_up = np.arange(n_el) < n_up
        opposite = spin_up[:, None] != spin_up[None, :]  # (i, k)

        def select(x):
            """(k, I, 2, ...) -> (i, k, I, ...): the spin pairing t of every (i, k)."""
            mask = opposite.reshape(opposite.shape + (1,) * (x.ndim - 2))
            return jnp.where(mask, x[None, :, :, 1], x[None, :, :, 0])

        envelope = jnp.exp(-select(alpha) * d_en[:, None, :, None])  # (i, k, I, d)
        inner = jnp.einsum("iw,ikIdw->ikId", h, select(f_scalar))
        if cfg.backflow_vectors:
            inner = inner + jnp.einsum("iIcx,ikIdcx->ikId", electron_vectors, select(f_vector))
        return jnp.einsum("ikId,ikId->dik", envelope, inner)

    def from_orbitals(self, electrons, inputs: AnsatzInputs, orbitals: OrbitalParameters):
        """(sign, log|psi|) of one configuration (n_el, 3) bohr."""
        matrices = self.orbital_matrices(electrons, inputs, orbitals)
        signs, log_dets = jnp.linalg.slogdet(matrices)
        sign, log_psi = _signed_logsumexp(log_dets, signs)
        if self.config.jastrow:
            log_psi = log_psi + self.jastrow(electrons, inputs.n_up)
        return sign, log_psi

    def __call__(self, electrons, inputs: AnsatzInputs):
        return self.from_orbitals(electrons, inputs, self.orbitals(inputs))


class WavefunctionFns(NamedTuple):
    """``signed(params, electrons) -> (sign, log|psi|)`` and ``log_psi(params, electrons) ->
    log|psi|`` for one configuration (n_el, 3) bohr; the second is what
    :mod:`vmc.hamiltonian` and :mod:`vmc.mcmc` take."""

    signed: Callable
    log_psi: Callable


def make_wavefunction(config: AnsatzConfig) -> Callable:
    """``fn(params, electrons (n_el, 3) bohr, inputs: AnsatzInputs) -> (sign, log|psi|)``:
    the molecule as an argument, so one function (and one compilation per shape) serves
    every geometry and molecule of a training set."""
    module = TransferableWavefunction(config)

    def wavefunction(params, electrons, inputs):
        # Under vmap over walkers the orbital half (which does not depend on the electrons)
        # stays unbatched: JAX evaluates it once for all walkers.
        return module.apply(params, electrons, inputs)

    return wavefunction


def make_orbital_matrices(config: AnsatzConfig) -> Callable:
    """``fn(params, electrons (n_el, 3) bohr, inputs) -> (n_det, n_el, n_el)``: the neural
    orbitals phi_k^d(r_i) (rows electrons, columns orbitals, spin-up first), for supervised
    pretraining against Hartree-Fock orbitals."""
    module = TransferableWavefunction(config)

    def orbital_matrices(params, electrons, inputs):
        orbitals = module.apply(params, inputs, method=module.orbitals)
        return module.apply(params, electrons, inputs, orbitals, method=module.orbital_matrices)

    return orbital_matrices


def init_params(key: jax.Array, config: AnsatzConfig, inputs: AnsatzInputs) -> Params:
    """Parameters for ``config``; ``inputs`` only supplies example shapes (any molecule)."""
    electrons = jnp.zeros((inputs.n_up + inputs.n_down, 3), inputs.atom_positions.dtype)
    electrons = electrons + jnp.arange(electrons.shape[0], dtype=electrons.dtype)[:, None]
    return TransferableWavefunction(config).init(key, electrons, inputs)


def make_log_psi(config: AnsatzConfig, inputs: AnsatzInputs) -> WavefunctionFns:
    """The wavefunction of one molecule: ``(signed, log_psi)`` closures over ``inputs``."""
    wavefunction = make_wavefunction(config)

    def signed(params, electrons):
        return wavefunction(params, electrons, inputs)

    def log_psi(params, electrons):
        return wavefunction(params, electrons, inputs)[1]

    return WavefunctionFns(signed, log_psi)
