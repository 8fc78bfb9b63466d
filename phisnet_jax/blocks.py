"""From equivariant pair features to AO matrices: Clebsch-Gordan expansion and assembly.

A block of an AO matrix between a shell of order l1 on atom i and a shell of order l2 on atom j
is a sum over irreps L = |l1 - l2| .. l1 + l2:

    block[m1, m2] = sqrt(2L + 1) sum_M CG(l1 m1, l2 m2 | L M) f_M      (e3nn basis)

and is then expressed in pyscf's AO order with ``basis.pyscf_to_e3nn``. The model predicts one
output channel per (element_i, element_j, shell_i, shell_j, L); ``expansion_tables`` holds, per
element pair and order L, the constant linear map from those channels to the padded
(A x A) atom-pair block, A being the largest number of AOs on one atom.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from molfoundation.basis import pyscf_to_e3nn
from molfoundation.elements import ElementBasis


def _clebsch_gordan(l1: int, l2: int, L: int) -> np.ndarray:
    import e3nn_jax as e3nn

    return np.asarray(e3nn.clebsch_gordan(l1, l2, L), dtype=np.float64)


@dataclasses.dataclass(frozen=True, eq=False)
class ExpansionTables:
    """Constant maps from output channels to padded atom-pair blocks.

    Attributes:
      channels: per order L, the number of output channels C_L (max over element pairs).
      tables: per order L, array (n_el, n_el, C_L, 2L+1, A, A): channel c with component M of
        element pair (a, b) contributes ``tables[L][a, b, c, M]`` to the block. Unused channels
        of element pairs with fewer shell pairs are zero.
      max_order: the largest L any block needs (2 x the largest shell l).
    """

    channels: tuple[int, ...]
    tables: tuple[np.ndarray, ...]
    max_order: int


def expansion_tables(element_basis: ElementBasis) -> ExpansionTables:
    eb = element_basis
    n_el = len(eb.elements)
    A = eb.max_atom_ao
    max_order = 2 * eb.max_l
    # Shell pairs (with AO offsets) of every element pair, grouped by output order L.
    entries: dict[int, dict[tuple[int, int], list]] = {L: {} for L in range(max_order + 1)}
    for a in range(n_el):
        for b in range(n_el):
            offsets_a = np.cumsum([0] + [2 * l + 1 for l in eb.shells[a]])
            offsets_b = np.cumsum([0] + [2 * l + 1 for l in eb.shells[b]])
            for sa, l1 in enumerate(eb.shells[a]):
                for sb, l2 in enumerate(eb.shells[b]):
                    for L in range(abs(l1 - l2), l1 + l2 + 1):
                        entries[L].setdefault((a, b), []).append(
                            (l1, l2, int(offsets_a[sa]), int(offsets_b[sb]))
                        )
    channels, tables = [], []
    for L in range(max_order + 1):
        C = max((len(v) for v in entries[L].values()), default=0)
        table = np.zeros((n_el, n_el, C, 2 * L + 1, A, A))
        for (a, b), shell_pairs in entries[L].items():
            for c, (l1, l2, off1, off2) in enumerate(shell_pairs):
                cg = np.sqrt(2 * L + 1) * _clebsch_gordan(l1, l2, L)  # (2l1+1, 2l2+1, 2L+1)
                Q1, Q2 = pyscf_to_e3nn(l1), pyscf_to_e3nn(l2)
                # pyscf block = Q1^T (e3nn block) Q2, for each component M.
                pyscf_cg = np.einsum("mp,mnM,nq->Mpq", Q1, cg, Q2)
                table[a, b, c, :, off1 : off1 + 2 * l1 + 1, off2 : off2 + 2 * l2 + 1] = pyscf_cg
        channels.append(C)
        tables.append(table)
    return ExpansionTables(tuple(channels), tuple(tables), max_order)


def atom_pair_blocks(
    outputs: list[jnp.ndarray], tables: ExpansionTables, element_index: jnp.ndarray
) -> jnp.ndarray:
    """(N, N, A, A) padded atom-pair blocks from per-pair output channels.

    ``outputs[L]``: (N, N, C_L, 2L+1) channels of every ordered atom pair; ``element_index``:
    (N,) element index of every atom (padding atoms: any valid index, masked later).
    """
    blocks = 0.0
    for L, out in enumerate(outputs):
        if tables.channels[L] == 0:
            continue
        table = jnp.asarray(tables.tables[L], dtype=out.dtype)  # (E, E, C, 2L+1, A, A)
        _, pairs = element_indicators(element_index, table.shape[0], out.dtype)
        blocks = blocks + jnp.einsum("ijabcM,abcMpq->ijpq", jnp.einsum("ijcM,ijab->ijabcM", out, pairs), table)
    return blocks


def element_indicators(z_idx, n_elements: int, dtype):
    """(N, E) one-hot elements of the atoms and (N, N, E, E) of the atom pairs.

    Per-element tables and weights are contracted with these instead of gathered per atom
    (pair): on CPU such a gather, per molecule of a batch, and the scatter-add of its
    gradient cost more than the contraction.
    """
    atoms = jax.nn.one_hot(z_idx, n_elements, dtype=dtype)
    return atoms, atoms[:, None, :, None] * atoms[None, :, None, :]


@dataclasses.dataclass(frozen=True, eq=False)
class AOIndex:
    """Where each AO of a (padded) molecule sits in the padded atom-pair blocks.

    Attributes:
      atom: (M,) atom of each AO; local: (M,) index of the AO among its atom's AOs;
      mask: (M,) True for real AOs (M may exceed the molecule's AO count for padding).
    """

    atom: np.ndarray
    local: np.ndarray
    mask: np.ndarray


def ao_index(element_basis: ElementBasis, element_index: np.ndarray, n_ao_padded: int | None = None) -> AOIndex:
    """AO placement for a molecule with element indices ``element_index`` (real atoms only)."""
    atom, local = [], []
    for i, e in enumerate(element_index):
        n = element_basis.atom_ao(int(e))
        atom.extend([i] * n)
        local.extend(range(n))
    n_ao = len(atom)
    M = n_ao if n_ao_padded is None else n_ao_padded
    if M < n_ao:
        raise ValueError(f"padding {M} is smaller than the {n_ao} AOs of the molecule")
    pad = M - n_ao
    return AOIndex(
        np.array(atom + [0] * pad, dtype=np.int32),
        np.array(local + [0] * pad, dtype=np.int32),
        np.array([True] * n_ao + [False] * pad),
    )


def assemble_matrix(blocks: jnp.ndarray, atom: jnp.ndarray, local: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """(M, M) AO matrix from (N, N, A, A) atom-pair blocks, zero on padded rows and columns."""
    matrix = blocks[atom[:, None], atom[None, :], local[:, None], local[None, :]]
    return jnp.where(mask[:, None] & mask[None, :], matrix, 0.0)
