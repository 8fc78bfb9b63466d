"""PhiSNet: SE(3)-equivariant prediction of Fock and overlap matrices (Unke et al. 2021).

``make_phisnet(config)`` returns a flax module whose ``apply`` maps one molecule (padded to
static shapes) to its Fock matrix F and overlap matrix S in pyscf's AO order:

    atoms --embedding--> scalar features --T x [residual, interaction, residual]--> sum of the
    modules' outputs --pair features (on-site / off-site, with neighbour sums)--> residual
    stacks per matrix --> output channels per (Z_i, Z_j, shell_i, shell_j, L) --Clebsch-Gordan-->
    atom-pair blocks --> symmetric F

with residual stacks where the original code has them, and, on a separate shallow branch that sees only the raw embeddings and the pair geometry, the
off-site overlap blocks (on-site overlap blocks are exact per-element constants, so the
diagonal of S is exactly 1). Positions are in bohr, matrices in hartree.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from molfoundation.elements import ElementBasis, electron_configuration, element_basis, onsite_overlap_blocks
from molfoundation.errors import InputError
from molfoundation.gaussians import overlap_blocks, overlap_tables
from phisnet_jax.blocks import ExpansionTables, assemble_matrix, atom_pair_blocks, element_indicators, expansion_tables
from phisnet_jax.layers import (
    PerOrderLinear,
    RadialPathWeights,
    ScalarSwish,
    SelfMixing,
    cg_paths,
    component_orders,
    order_parts,
    weighted_cg_product,
)
from phisnet_jax.radial import exponential_bernstein


@dataclasses.dataclass(frozen=True)
class PhiSNetConfig:
    """Architecture hyperparameters; the defaults are the paper's MD17 configuration.

    Attributes:
      elements: atomic numbers the model handles.
      basis: AO basis set of the predicted matrices.
      features: channels per order.
      max_order: largest feature order L; at least 2 x the largest shell l of the basis.
      num_modules: modules whose outputs are summed.
      num_radial: exponential-Bernstein radial functions.
      cutoff: smooth cutoff radius, bohr.
      residual_blocks: blocks in each residual stack of the modules (before and after each
        interaction, on its i and j paths and its messages, on the module outputs) and of the
        pair features (central and neighbour atoms, shared on-site and off-site stacks).
      head_residual_blocks: blocks in the on-site and off-site stacks of each predicted matrix
        (F, H_core) before its output channels. (The paper configuration for H, C, O in
        def2-SVP has 14.3 M parameters, 15.1 M with the H_core head.)
      overlap_features: channels of the overlap branch.
      core_hamiltonian: also predict a core Hamiltonian H_core (from the same pair features),
        which defines the model's energy and forces (``train.make_energy_and_forces``).
    """

    elements: tuple[int, ...] = (1, 6, 7, 8)
    basis: str = "def2-svp"
    features: int = 128
    max_order: int = 4
    num_modules: int = 5
    num_radial: int = 128
    cutoff: float = 15.0
    residual_blocks: int = 1
    head_residual_blocks: int = 2
    overlap_features: int = 32
    core_hamiltonian: bool = False

    def __post_init__(self):
        object.__setattr__(self, "elements", tuple(int(z) for z in self.elements))
        object.__setattr__(self, "basis", self.basis.lower())

    @property
    def element_basis(self) -> ElementBasis:
        return element_basis(self.elements, self.basis)

    def check(self) -> None:
        needed = 2 * self.element_basis.max_l
        if self.max_order < needed:
            raise InputError(
                f"feature order {self.max_order} is too low for basis {self.basis!r}: its "
                f"l = {self.element_basis.max_l} shells need order {needed}"
            )


PAPER_PRESET: dict = {}
"""The paper's MD17 configuration: the :class:`PhiSNetConfig` defaults (14.3 M parameters for
H, C, O in def2-SVP), for GPU runs that reproduce the published accuracy."""

SMALL_PRESET = {"features": 32, "num_modules": 2, "num_radial": 32, "overlap_features": 16}
"""A network for CPU runs (0.50 M parameters for water in def2-SVP; about 76 micro-hartree MAE
of F after 90 minutes on two cores): the paper's architecture with fewer channels, modules and
radial functions."""

TINY_PRESET = {"features": 8, "num_modules": 1, "num_radial": 16, "overlap_features": 4,
               "residual_blocks": 0, "head_residual_blocks": 1}
"""The smallest network with every part of the architecture, for smoke tests and the test
suite, where compilation time dominates: residual stacks only in the per-matrix heads (one
block each)."""

MODEL_PRESETS = {"paper": PAPER_PRESET, "small": SMALL_PRESET, "tiny": TINY_PRESET}
"""Named :class:`PhiSNetConfig` overrides (``phisnet train --preset``); ``elements``, ``basis``
and ``max_order`` come from the data."""


@dataclasses.dataclass(frozen=True)
class MoleculeInputs:
    """One molecule padded to static shapes (all arrays jnp or np).

    Attributes:
      element_index: (N,) int32 index into ``config.elements`` (any valid index for padding).
      positions: (N, 3) bohr.
      atom_mask: (N,) bool, True for real atoms.
      ao_atom, ao_local, ao_mask: (M,) placement of each AO (see ``blocks.AOIndex``).
    """

    element_index: jnp.ndarray
    positions: jnp.ndarray
    atom_mask: jnp.ndarray
    ao_atom: jnp.ndarray
    ao_local: jnp.ndarray
    ao_mask: jnp.ndarray


jax.tree_util.register_dataclass(
    MoleculeInputs,
    data_fields=["element_index", "positions", "atom_mask", "ao_atom", "ao_local", "ao_mask"],
    meta_fields=[],
)


def _pair_geometry(positions, atom_mask, cutoff):
    """Distances, unit vectors and the pair mask, safe (finite gradients) on excluded pairs."""
    n = positions.shape[0]
    pair_mask = atom_mask[:, None] & atom_mask[None, :] & ~jnp.eye(n, dtype=bool)
    diff = positions[None, :, :] - positions[:, None, :]  # r_j - r_i for pair (i, j)
    diff = jnp.where(pair_mask[..., None], diff, 1.0)  # finite norm and gradient on excluded pairs
    distance = jnp.linalg.norm(diff, axis=-1)
    pair_mask = pair_mask & (distance < cutoff)
    return distance, diff / distance[..., None], pair_mask


def _spherical_harmonics(unit_vectors, max_order):
    import e3nn_jax as e3nn

    # The 'e' labels match the SO(3) feature convention (see layers.py); on proper rotations
    # these are e3nn's usual harmonics.
    sh = e3nn.spherical_harmonics(
        "+".join(f"{l}e" for l in range(max_order + 1)), unit_vectors, normalize=True,
        normalization="component",
    )
    return sh.array


class ResidualBlock(nn.Module):
    """Pre-activation residual block: x + Linear(SelfMix(act(Linear(act(x)))))."""

    features: int
    max_order: int

    @nn.compact
    def __call__(self, x):
        h = PerOrderLinear(self.features, self.max_order)(ScalarSwish()(x))
        h = SelfMixing(self.max_order)(ScalarSwish()(h))
        return x + PerOrderLinear(self.features, self.max_order)(h)


def residual_stack(x, n_blocks: int, features: int, max_order: int, name: str):
    """``n_blocks`` residual blocks named ``{name}_0``, ``{name}_1``, ... (call inside a compact module)."""
    for k in range(n_blocks):
        x = ResidualBlock(features, max_order, name=f"{name}_{k}")(x)
    return x


class Interaction(nn.Module):
    """Messages from all neighbours, as in the original code.

    The receiving atom i and the sending atoms j get their own residual stack, activation and
    linear map; v_i = y_i + sum_j PairMix(y_j, Y(r_ij); radial weights of r_ij) is refined by a
    third stack, activated, mapped linearly and added to x_i.
    """

    features: int
    max_order: int
    residual_blocks: int

    @nn.compact
    def __call__(self, x, radial, harmonics):
        F, L, n = self.features, self.max_order, self.residual_blocks

        def path(name):
            h = residual_stack(x, n, F, L, f"{name}_residual")
            return PerOrderLinear(F, L, name=f"{name}_linear")(ScalarSwish(name=f"{name}_activation")(h))

        receiver, sender = path("receiver"), path("sender")
        paths = cg_paths(L)
        # Zero beyond the cutoff and for i = j, as the radial basis is there.
        weights = RadialPathWeights(paths, L, F, name="pair_mixing_radial")(radial)
        messages = weighted_cg_product(sender, harmonics, paths, weights, "jaf,ijb->ijcf", L).sum(axis=1)
        v = residual_stack(receiver + messages, n, F, L, "message_residual")
        return x + PerOrderLinear(F, L, name="message_linear")(ScalarSwish(name="message_activation")(v))


class PhiSNet(nn.Module):
    """The network; see the module docstring. Call it through ``apply(params, inputs)``."""

    config: PhiSNetConfig
    tables: ExpansionTables
    onsite_overlap: np.ndarray  # (n_elements, A, A)

    @nn.compact
    def __call__(self, inputs: MoleculeInputs) -> dict[str, jnp.ndarray]:
        cfg = self.config
        L, F = cfg.max_order, cfg.features
        dtype = inputs.positions.dtype
        n_el = len(cfg.elements)
        z_idx = inputs.element_index

        distance, unit, pair_mask = _pair_geometry(inputs.positions, inputs.atom_mask, cfg.cutoff)
        decay = jax.nn.softplus(self.param("radial_decay", nn.initializers.constant(np.log(np.expm1(0.5))), (), dtype))
        radial = exponential_bernstein(distance, cfg.num_radial, decay, cfg.cutoff)
        radial = radial * pair_mask[..., None]
        harmonics = _spherical_harmonics(unit, L)  # (N, N, (L+1)^2)

        # Embedding: a learned vector per element plus a linear map of its electron configuration.
        descriptors = jnp.asarray(np.stack([electron_configuration(z) for z in cfg.elements]), dtype)
        element_vectors = nn.Embed(n_el, F, param_dtype=dtype, name="element_embedding")(z_idx)
        scalars = element_vectors + nn.Dense(F, use_bias=False, param_dtype=dtype, name="configuration_embedding")(descriptors[z_idx])
        x = jnp.zeros(scalars.shape[:-1] + ((L + 1) ** 2, F), dtype).at[..., 0, :].set(scalars)
        x = x * inputs.atom_mask[:, None, None]

        final = 0.0
        for m in range(cfg.num_modules):
            x = residual_stack(x, cfg.residual_blocks, F, L, f"module{m}_pre")
            x = Interaction(F, L, cfg.residual_blocks, name=f"module{m}_interaction")(x, radial, harmonics)
            x = residual_stack(x, cfg.residual_blocks, F, L, f"module{m}_post")
            final = final + residual_stack(x, cfg.residual_blocks, F, L, f"module{m}_output")

        fock, core = self._hamiltonians(final, radial, pair_mask, z_idx, inputs)
        overlap = self._overlap(scalars, radial, harmonics, pair_mask, z_idx, inputs)
        out = {"fock": fock, "overlap": overlap}
        if core is not None:
            out["core_hamiltonian"] = core
        return out

    def _hamiltonians(self, final, radial, pair_mask, z_idx, inputs):
        """(F, H_core or None) from the final atom features."""
        cfg = self.config
        L, F = cfg.max_order, cfg.features
        a = residual_stack(final, cfg.residual_blocks, F, L, "pair_central")
        b = residual_stack(final, cfg.residual_blocks, F, L, "pair_neighbour")

        def neighbour_terms(name):
            """(N, N, D, F) R(r_ik) * b_k with radial weights per order and channel, and their
            sums over k != i, (N, D, F)."""
            weights = nn.Dense(F * (L + 1), use_bias=False, param_dtype=radial.dtype, name=name)(radial)
            weights = weights.reshape(radial.shape[:-1] + (F, L + 1)) * pair_mask[..., None, None]
            per_component = jnp.swapaxes(weights[..., component_orders(L)], -1, -2)  # (N, N, D, F)
            contributions = per_component * b[None, :, :, :]
            return contributions, contributions.sum(axis=1)

        _, onsite_sum = neighbour_terms("onsite_neighbour_radial")
        contributions, neighbour_sum = neighbour_terms("offsite_neighbour_radial")
        onsite = a + onsite_sum
        paths = cg_paths(L)
        pair_weights = RadialPathWeights(paths, L, F, name="pair_mixing_radial")(radial)
        offsite = weighted_cg_product(a, a, paths, pair_weights, "iaf,jbf->ijcf", L)
        offsite = offsite + neighbour_sum[:, None] - contributions  # sum over k not in {i, j}
        onsite = residual_stack(onsite, cfg.residual_blocks, F, L, "onsite_residual")
        offsite = residual_stack(offsite, cfg.residual_blocks, F, L, "offsite_residual")

        def head(prefix):
            refined = []
            for kind, features in (("onsite", onsite), ("offsite", offsite)):
                name = f"{prefix or 'fock_'}{kind}"
                h = residual_stack(features, cfg.head_residual_blocks, F, L, f"{name}_residual")
                refined.append(ScalarSwish(name=f"{name}_activation")(h))
            return self._matrix_head(prefix, *refined, z_idx, inputs)

        fock = head("")
        return fock, head("core_") if cfg.core_hamiltonian else None

    def _matrix_head(self, prefix, onsite, offsite, z_idx, inputs):
        """A symmetric AO matrix from pair features: channels per (Z_i, Z_j, shells, L), CG blocks."""
        cfg = self.config
        F = cfg.features
        n_el = len(cfg.elements)
        n = z_idx.shape[0]
        is_diagonal = jnp.eye(n, dtype=bool)
        atoms, pairs = element_indicators(z_idx, n_el, onsite.dtype)
        onsite_parts, offsite_parts = order_parts(onsite, cfg.max_order), order_parts(offsite, cfg.max_order)
        outputs = []
        for order in range(self.tables.max_order + 1):
            C = self.tables.channels[order]
            if C == 0:
                outputs.append(jnp.zeros((n, n, 0, 2 * order + 1), onsite.dtype))
                continue
            init = nn.initializers.normal(1.0 / np.sqrt(F))
            w_off = self.param(f"{prefix}offsite_head_{order}", init, (n_el, n_el, F, C), onsite.dtype)
            w_on = self.param(f"{prefix}onsite_head_{order}", init, (n_el, F, C), onsite.dtype)
            out_off = jnp.einsum("ijabMf,abfc->ijcM", jnp.einsum("ijMf,ijab->ijabMf", offsite_parts[order], pairs), w_off)
            out_on = jnp.einsum("iaMf,afc->icM", jnp.einsum("iMf,ia->iaMf", onsite_parts[order], atoms), w_on)
            if order == 0:
                # Invariant per-element constants of the on-site blocks (e.g. core orbital
                # energies); ``initial_onsite_offsets`` sets them to training-data means.
                offset = self.param(f"{prefix}onsite_offset", nn.initializers.zeros, (n_el, C), onsite.dtype)
                out_on = out_on.at[..., 0].add(offset[z_idx])
            outputs.append(jnp.where(is_diagonal[:, :, None, None], out_on[:, None], out_off))
        blocks = atom_pair_blocks(outputs, self.tables, z_idx)
        matrix = assemble_matrix(blocks, inputs.ao_atom, inputs.ao_local, inputs.ao_mask)
        return 0.5 * (matrix + matrix.T)

    def _overlap(self, scalars, radial, harmonics, pair_mask, z_idx, inputs):
        """Off-site blocks from (embedding_i * embedding_j) x radial weights x Y^L(r_ij)."""
        cfg = self.config
        Fs = cfg.overlap_features
        e = nn.Dense(Fs, param_dtype=scalars.dtype, name="overlap_embedding")(scalars)
        pair_scalars = e[:, None, :] * e[None, :, :]  # (N, N, Fs)
        n = z_idx.shape[0]
        _, pairs = element_indicators(z_idx, len(cfg.elements), scalars.dtype)
        harmonic_parts = order_parts(harmonics, cfg.max_order, axis=-1)  # (N, N, 2L+1) each
        outputs = []
        for order in range(self.tables.max_order + 1):
            C = self.tables.channels[order]
            if C == 0:
                outputs.append(jnp.zeros((n, n, 0, 2 * order + 1), scalars.dtype))
                continue
            radial_w = nn.Dense(Fs, use_bias=False, param_dtype=radial.dtype, name=f"overlap_radial_{order}")(radial)
            amplitude = pair_scalars * radial_w  # (N, N, Fs)
            head = self.param(
                f"overlap_head_{order}", nn.initializers.normal(1.0 / np.sqrt(Fs)),
                (len(cfg.elements), len(cfg.elements), Fs, C), scalars.dtype,
            )
            channels = jnp.einsum("ijabf,abfc->ijc", jnp.einsum("ijf,ijab->ijabf", amplitude, pairs), head)
            outputs.append(channels[..., None] * harmonic_parts[order][:, :, None, :] * pair_mask[..., None, None])
        offsite = atom_pair_blocks(outputs, self.tables, z_idx)
        onsite = jnp.asarray(self.onsite_overlap, scalars.dtype)[z_idx]  # (N, A, A)
        n_range = jnp.arange(n)
        blocks = offsite.at[n_range, n_range].set(onsite)
        overlap = assemble_matrix(blocks, inputs.ao_atom, inputs.ao_local, inputs.ao_mask)
        return 0.5 * (overlap + overlap.T)


def make_phisnet(config: PhiSNetConfig) -> PhiSNet:
    """The PhiSNet module for ``config`` (checks that the feature order suits the basis)."""
    config.check()
    eb = config.element_basis
    return PhiSNet(config, expansion_tables(eb), onsite_overlap_blocks(eb))


def make_inputs(
    config: PhiSNetConfig, atomic_numbers, positions, n_atoms: int | None = None, n_ao: int | None = None
) -> MoleculeInputs:
    """Model inputs for one molecule, padded to ``n_atoms`` atoms and ``n_ao`` AOs if given.

    Raises ``InputError`` for an element the model does not know.
    """
    from phisnet_jax.blocks import ao_index

    eb = config.element_basis
    z_idx = eb.index_of(atomic_numbers)
    n = len(z_idx)
    N = n if n_atoms is None else n_atoms
    pos = np.zeros((N, 3))
    pos[:n] = positions
    # Padding atoms sit far apart from everything so that their (masked) distances stay finite.
    pos[n:] = 1e3 * (1 + np.arange(N - n))[:, None]
    index = ao_index(eb, z_idx, n_ao)
    return MoleculeInputs(
        element_index=np.concatenate([z_idx, np.zeros(N - n, np.int32)]),
        positions=pos,
        atom_mask=np.arange(N) < n,
        ao_atom=index.atom,
        ao_local=index.local,
        ao_mask=index.mask,
    )


def make_exact_overlap(config: PhiSNetConfig):
    """``f(inputs: MoleculeInputs) -> (M, M)``: the exact overlap matrix of a padded molecule in
    the model's AO layout (zero on padded AOs), from the basis and the geometry alone; jit-able
    and differentiable in ``inputs.positions`` (``molfoundation.gaussians``)."""
    tables = overlap_tables(config.element_basis)

    def exact_overlap(inputs: MoleculeInputs) -> jnp.ndarray:
        blocks = overlap_blocks(tables, inputs.element_index, inputs.positions)
        return assemble_matrix(blocks, inputs.ao_atom, inputs.ao_local, inputs.ao_mask)

    return exact_overlap


def initial_onsite_offsets(config: PhiSNetConfig, element_index: np.ndarray, ao_atom: np.ndarray,
                           ao_local: np.ndarray, ao_mask: np.ndarray, fock: np.ndarray) -> np.ndarray:
    """(n_elements, C_0) mean scalar (L = 0) channels of the on-site Fock blocks of a data set.

    Arguments are stacked model inputs and reference Fock matrices (n, M, M) hartree. The L = 0
    channels of a block are its projections on the (mutually orthogonal) channel patterns of the
    expansion table; they are rotation-invariant, so their means are a safe starting point.
    """
    tables = expansion_tables(config.element_basis)
    table0 = tables.tables[0][:, :, :, 0]  # (n_el, n_el, C0, A, A)
    n_el, A = table0.shape[0], table0.shape[-1]
    sums = np.zeros((n_el, table0.shape[2]))
    counts = np.zeros(n_el)
    for n in range(fock.shape[0]):
        for atom in np.unique(ao_atom[n][ao_mask[n]]):
            rows = np.flatnonzero((ao_atom[n] == atom) & ao_mask[n])
            block = np.zeros((A, A))
            block[np.ix_(ao_local[n][rows], ao_local[n][rows])] = fock[n][np.ix_(rows, rows)]
            e = int(element_index[n][atom])
            patterns = table0[e, e]
            norms = np.einsum("cpq,cpq->c", patterns, patterns)
            sums[e] += np.where(norms > 0, np.einsum("cpq,pq->c", patterns, block) / np.maximum(norms, 1e-30), 0.0)
            counts[e] += 1
    return sums / np.maximum(counts, 1)[:, None]
