"""Random projection matrices for random-feature attention.

Shape legend: M random features, H key dim (``dim`` here), K number of square blocks.
"""

import math

import keras
from keras import ops

from keras_favor._checks import positive_int

ROW_NORMS = ("chi", "sqrt_dim")


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
    if row_norms not in ROW_NORMS:
        raise ValueError(
            f"Received an invalid value for argument `row_norms`, expected one of {ROW_NORMS}. "
            f"Received: row_norms={row_norms!r}"
        )
    if not isinstance(orthogonal, bool):
        raise ValueError(
            f"Received an invalid value for argument `orthogonal`, expected a bool. "
            f"Received: orthogonal={orthogonal!r}"
        )
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
