"""Random projection matrices for random-feature attention.

Shape legend: M random features, H key dim (``dim`` here), K number of square blocks.
"""

import hashlib
import math

import keras
from keras import ops

from keras_favor._checks import boolean, one_of, positive_int

ROW_NORMS = ("chi", "sqrt_dim")


def derive_seed(seed, *parts):
    """A seed in [0, 2**31) derived from the int `seed` and `parts` (ints or short strings).

    The one seed mixer of the package (sub-layers of a block, redraws of a layer, redraws by the
    callback): a keyed BLAKE2b hash of the parts, not Python's salted `hash`, so every process
    and every resumed run derives the same seeds, and nearby inputs give unrelated seeds.
    """
    message = ":".join(str(part) for part in (int(seed), *parts)).encode()
    digest = hashlib.blake2b(message, digest_size=8, person=b"kf-redraw").digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def random_features_matrix(num_features, dim, *, orthogonal=True, row_norms="chi", seed=None):
    """Draws the random projection ω used by random-feature attention.

    Orthogonal features stack ``ceil(num_features / dim)`` independent square blocks, each the Q
    factor of a Gaussian matrix with the sign fix ``Q · sign(diag R)`` so that it is Haar
    distributed (plain QR is not: its diagonal is biased towards one sign, which biases FAVOR+).
    Rows within a block are exactly orthogonal; blocks are independent; any ``num_features`` works
    (the last block is truncated).

    Args:
        num_features: M, the number of rows (random features), a positive int.
        dim: H, the width of each row (the key dim), a positive int.
        orthogonal: stacked orthogonal blocks (True, the default) or i.i.d. Gaussian rows.
        row_norms: ``"chi"`` gives each row the norm of an independent d-dimensional Gaussian
            vector, so every row is marginally N(0, I) as the FAVOR+ estimator needs;
            ``"sqrt_dim"`` gives every row norm ``sqrt(dim)`` (lower variance, slightly biased).
        seed: an int, a `keras.random.SeedGenerator`, or None (the global generator).

    Returns:
        A float32 tensor of shape (M, H).

    Example:

    >>> w = random_features_matrix(96, 64, seed=0)
    >>> tuple(w.shape)
    (96, 64)

    References:
        Choromanski et al., Rethinking Attention with Performers, arXiv 2009.14794.
        Mezzadri, How to generate random matrices from the classical compact groups, 2007.
    """
    positive_int(num_features, "num_features")
    positive_int(dim, "dim")
    one_of(row_norms, ROW_NORMS, "row_norms")
    boolean(orthogonal, "orthogonal")
    num_blocks = math.ceil(num_features / dim) if orthogonal else 0
    # One draw for everything keeps an int seed meaningful (stateless) and a generator advancing
    # once: the first K*H rows feed the QR blocks, the last M rows give the chi row norms.
    gaussian = keras.random.normal(
        (num_blocks * dim + num_features, dim), seed=seed, dtype="float32"
    )
    rows = gaussian[num_blocks * dim :]  # (M, H), i.i.d. N(0, I)
    if orthogonal:
        blocks = ops.reshape(gaussian[: num_blocks * dim], (num_blocks, dim, dim))
        q, r = ops.qr(blocks, mode="reduced")  # (K, H, H) each
        sign = ops.where(ops.diagonal(r, axis1=-2, axis2=-1) < 0, -1.0, 1.0)  # (K, H)
        q = q * ops.expand_dims(sign, -2)  # scale columns: Haar distributed
        directions = ops.reshape(ops.transpose(q, (0, 2, 1)), (num_blocks * dim, dim))
        directions = directions[:num_features]  # unit rows, orthogonal within a block
        if row_norms == "chi":
            norms = ops.sqrt(ops.sum(ops.square(rows), axis=-1, keepdims=True))
        else:
            norms = ops.full((num_features, 1), math.sqrt(dim), dtype="float32")
        return directions * norms
    if row_norms == "sqrt_dim":
        rows = rows * (math.sqrt(dim) / ops.sqrt(ops.sum(ops.square(rows), axis=-1, keepdims=True)))
    return rows
