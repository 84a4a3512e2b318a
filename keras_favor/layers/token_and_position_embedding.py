"""Token embedding plus (learned, sinusoidal or no) position embedding."""

import keras
from keras import ops

from keras_favor._checks import boolean, one_of, positive_int, positive_number
from keras_favor.layers.position_embedding import PositionEmbedding
from keras_favor.layers.sine_position_encoding import SinePositionEncoding

POSITION_EMBEDDING_TYPES = ("learned", "sine", None)


@keras.saving.register_keras_serializable(package="keras_favor")
class TokenAndPositionEmbedding(keras.layers.Layer):
    """Token embeddings plus position embeddings, the usual first layer of a Transformer.

    Args:
        vocabulary_size: the number of token ids, a positive integer.
        sequence_length: the number of positions of the learned table (required for
            `"learned"`); optional for `"sine"` and None, where it is only recorded.
        embedding_dim: the width E of the embeddings, a positive integer.
        position_embedding_type: `"learned"` (a `PositionEmbedding` table, default), `"sine"`
            (`SinePositionEncoding`, no weights, no length limit) or None (token embeddings only,
            for models whose blocks use rotary embeddings).
        embeddings_initializer: initializer of the token table and of the learned position
            table. Defaults to `"uniform"` (as `keras.layers.Embedding`).
        mask_zero: whether token id 0 is padding. If True, the layer returns a padding mask
            (`inputs != 0`) that the Favor blocks downstream honour.
        max_wavelength: the `max_wavelength` of the sinusoids for `"sine"`. Defaults to 10000.
        **kwargs: standard `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: (B, T) integer token ids.
        start_index: the position of the first token, as in `PositionEmbedding` (int, or
            integer tensor of shape () or (B,): one offset per sequence). Defaults to 0.

    Returns:
        The (B, T, E) sums of token and position embeddings, in the compute dtype.

    Example:

    >>> import numpy as np
    >>> layer = TokenAndPositionEmbedding(100, 16, 8, mask_zero=True)
    >>> tuple(layer(np.array([[5, 7, 0]])).shape)
    (1, 3, 8)

    References:
        Vaswani et al., Attention Is All You Need, arXiv 1706.03762.
    """

    def __init__(
        self,
        vocabulary_size,
        sequence_length,
        embedding_dim,
        position_embedding_type="learned",
        embeddings_initializer="uniform",
        mask_zero=False,
        max_wavelength=10000,
        **kwargs,
    ):
        positive_int(vocabulary_size, "vocabulary_size")
        positive_int(embedding_dim, "embedding_dim")
        one_of(position_embedding_type, POSITION_EMBEDDING_TYPES, "position_embedding_type")
        positive_int(
            sequence_length, "sequence_length", allow_none=position_embedding_type != "learned"
        )
        boolean(mask_zero, "mask_zero")
        positive_number(max_wavelength, "max_wavelength")
        super().__init__(**kwargs)
        self.vocabulary_size = vocabulary_size
        self.sequence_length = sequence_length
        self.embedding_dim = embedding_dim
        self.position_embedding_type = position_embedding_type
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)
        self.mask_zero = mask_zero
        self.max_wavelength = max_wavelength
        self.supports_masking = mask_zero

        self.token_embedding = keras.layers.Embedding(
            vocabulary_size,
            embedding_dim,
            embeddings_initializer=keras.initializers.get(
                keras.initializers.serialize(self.embeddings_initializer)
            ),
            mask_zero=mask_zero,
            dtype=self.dtype_policy,
            name="token_embedding",
        )
        if position_embedding_type == "learned":
            self.position_embedding = PositionEmbedding(
                sequence_length,
                initializer=keras.initializers.get(
                    keras.initializers.serialize(self.embeddings_initializer)
                ),
                dtype=self.dtype_policy,
                name="position_embedding",
            )
        elif position_embedding_type == "sine":
            self.position_embedding = SinePositionEncoding(
                max_wavelength, dtype=self.dtype_policy, name="position_embedding"
            )
        else:
            self.position_embedding = None

    def build(self, inputs_shape):
        self.token_embedding.build(inputs_shape)
        if self.position_embedding is not None:
            self.position_embedding.build(tuple(inputs_shape) + (self.embedding_dim,))
        self.built = True

    def call(self, inputs, start_index=0):
        embeddings = self.token_embedding(inputs)  # (B, T, E)
        if self.position_embedding is not None:
            embeddings = embeddings + self.position_embedding(embeddings, start_index=start_index)
        return embeddings

    def compute_mask(self, inputs, mask=None):
        if not self.mask_zero:
            return None
        return ops.not_equal(inputs, 0)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape) + (self.embedding_dim,)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "vocabulary_size": self.vocabulary_size,
                "sequence_length": self.sequence_length,
                "embedding_dim": self.embedding_dim,
                "position_embedding_type": self.position_embedding_type,
                "embeddings_initializer": keras.initializers.serialize(self.embeddings_initializer),
                "mask_zero": self.mask_zero,
                "max_wavelength": self.max_wavelength,
            }
        )
        return config
