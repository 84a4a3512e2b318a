"""How well each feature map approximates softmax attention, vs the number of random features.

One run prints and stores (benchmarks/results/approximation.json, approximation.png):
- kernel relative MSE of the estimate of exp(qᵀk/√H) over random (q, k) pairs, for every softmax map,
  orthogonal and i.i.d. features, at two input-norm regimes;
- attention-output relative error vs exact softmax attention (non-causal), every map (relu and elu are
  not softmax estimators: their error is shown for reference);
- the estimator's bias over many independent draws of ω: orthogonal features with the sign fix vs plain
  QR (which is not Haar distributed and biases FAVOR+), and i.i.d.

Regimes are stated by the scale σ of the query/key entries at H=64: σ=0.25 gives ‖q·H^(-1/4)‖² ≈ 0.5
(low variance: ‖x+y‖² ≈ 1), σ=0.5 gives ≈ 2, σ=1.0 gives ≈ 8 (unit-variance entries: every estimator's
high-variance regime, where the relative variance grows like exp(‖x+y‖²) and means over a few draws are
dominated by rare large values).

    python benchmarks/approximation.py [--quick]
"""

import argparse
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


from benchmarks.common import RESULTS_DIR, run_info, write_json  # noqa: E402
from keras_favor import feature_maps  # noqa: E402
from keras_favor.ops import favor_attention, random_features_matrix  # noqa: E402

SOFTMAX_MAPS = ["softmax_positive", "softmax_hyperbolic", "softmax_optimal", "softmax_trig"]
ALL_MAPS = SOFTMAX_MAPS + ["relu", "elu"]


def _estimates(name, q, k, projection):
    """Unshifted kernel estimates φ(q)ᵀφ(k) of exp(qᵀk/√H) for all pairs: (P,) for P pairs."""
    key_dim = q.shape[-1]
    x, y = q * key_dim**-0.25, k * key_dim**-0.25
    w = projection
    num = w.shape[0]
    ux, uy = x @ w.T, y @ w.T  # (P, M)
    hx, hy = 0.5 * (x**2).sum(-1, keepdims=True), 0.5 * (y**2).sum(-1, keepdims=True)
    if name == "softmax_positive":
        fx, fy = np.exp(ux - hx), np.exp(uy - hy)
        return (fx * fy).sum(-1) / num
    if name == "softmax_hyperbolic":
        fx = np.concatenate([np.exp(ux - hx), np.exp(-ux - hx)], -1)
        fy = np.concatenate([np.exp(uy - hy), np.exp(-uy - hy)], -1)
        return (fx * fy).sum(-1) / (2 * num)
    if name == "softmax_trig":
        fx = np.concatenate([np.sin(ux), np.cos(ux)], -1) * np.exp(hx)
        fy = np.concatenate([np.sin(uy), np.cos(uy)], -1) * np.exp(hy)
        return (fx * fy).sum(-1) / num
    if name == "softmax_optimal":
        # A* from the pairs' statistics, as the map computes it non-causally.
        phi_bar = (x**2).sum(-1).mean() + (y**2).sum(-1).mean() + 2 * x.mean(0) @ y.mean(0)
        rho = max(phi_bar, 0.0) / key_dim
        a = (1 - 2 * rho - math.sqrt((2 * rho + 1) ** 2 + 8 * rho)) / 16
        b = math.sqrt(1 - 4 * a)
        d = (1 - 4 * a) ** (key_dim / 4)
        omega_sq = (w**2).sum(-1)
        fx = d * np.exp(a * omega_sq + b * ux - hx)
        fy = d * np.exp(a * omega_sq + b * uy - hy)
        return (fx * fy).sum(-1) / num
    raise ValueError(name)


def _draw(num, dim, seed, kind):
    if kind == "orthogonal":
        return np.asarray(random_features_matrix(num, dim, seed=seed), np.float64)
    if kind == "iid":
        return np.asarray(random_features_matrix(num, dim, orthogonal=False, seed=seed), np.float64)
    if kind == "plain_qr":  # the pitfall: QR without the sign fix (not Haar)
        rng = np.random.default_rng(seed)
        blocks = []
        for _ in range(math.ceil(num / dim)):
            qmat, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
            blocks.append(qmat.T)
        norms = np.linalg.norm(rng.normal(size=(num, dim)), axis=-1, keepdims=True)
        return np.concatenate(blocks)[:num] * norms
    raise ValueError(kind)


def kernel_mse(dim, sigma, nums, draws, pairs, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(scale=sigma, size=(pairs, dim))
    k = rng.normal(scale=sigma, size=(pairs, dim))
    exact = np.exp((q * k).sum(-1) / math.sqrt(dim))
    rows = []
    for name in SOFTMAX_MAPS:
        for kind in ("orthogonal", "iid"):
            for num in nums:
                errs = [
                    (
                        (_estimates(name, q, k, _draw(num, dim, 1000 * s + num, kind)) - exact) ** 2
                    ).mean()
                    for s in range(draws)
                ]
                rows.append(
                    {
                        "map": name,
                        "features": kind,
                        "M": num,
                        "relative_mse": float(np.mean(errs) / (exact**2).mean()),
                    }
                )
    return rows


def estimator_bias(dim, sigma, num, draws, seed=0):
    """Relative bias of the positive estimator over `draws` draws of ω, with its standard error."""
    rng = np.random.default_rng(seed)
    q = rng.normal(scale=sigma, size=(16, dim))
    k = rng.normal(scale=sigma, size=(16, dim))
    exact = np.exp((q * k).sum(-1) / math.sqrt(dim))
    out = {}
    for kind in ("orthogonal", "plain_qr", "iid"):
        est = np.stack(
            [
                _estimates("softmax_positive", q, k, _draw(num, dim, 7919 * s + 1, kind))
                for s in range(draws)
            ]
        )  # (draws, pairs)
        ratio = est / exact  # unbiased: mean 1
        mean = ratio.mean()
        stderr = ratio.mean(1).std(ddof=1) / math.sqrt(draws)
        out[kind] = {
            "relative_bias": float(mean - 1.0),
            "standard_error": float(stderr),
            "z": float((mean - 1.0) / stderr),
        }
    return out


def attention_error(dim, sigma, nums, draws, length=256, heads=2, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(scale=sigma, size=(1, length, heads, dim)).astype("float32")
    k = rng.normal(scale=sigma, size=(1, length, heads, dim)).astype("float32")
    v = rng.normal(size=(1, length, heads, dim)).astype("float32")
    s = np.einsum("bthd,bshd->bhts", q, k) / math.sqrt(dim)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    exact = np.einsum("bhts,bshd->bthd", p, v)
    rows = []
    for name in ALL_MAPS:
        fmap = feature_maps.get(name)
        for num in nums if fmap.uses_random_features else [None]:
            errs = []
            for d in range(draws if fmap.uses_random_features else 1):
                proj = random_features_matrix(num, dim, seed=31 * d + 7) if num else None
                out = np.asarray(favor_attention(q, k, v, fmap, proj))
                errs.append(np.linalg.norm(out - exact) / np.linalg.norm(exact))
            rows.append({"map": name, "M": num, "relative_error": float(np.mean(errs))})
    return rows


PRECISION_MAPS = ["softmax_positive", "softmax_hyperbolic", "softmax_optimal"]
# What a layer under each Keras dtype policy hands the op: (input dtype, matmul_dtype).
PRECISIONS = {
    "float32": ("float32", "float32"),
    "mixed_bfloat16": ("bfloat16", None),  # the fast path: bfloat16 logits and products
    "mixed_float16": ("float16", None),  # float16 inputs, features and sums in float32
}


def precision_error(dim, sigma, nums, draws, length=256, heads=2, seed=0):
    """Attention-output relative error vs exact softmax (float64) per policy, on the same draws.

    The inputs are rounded to each policy's compute dtype before the op, as a layer under that
    policy hands them over; the exact reference uses the float32 inputs. Non-causal and causal.
    """
    from keras import ops

    rng = np.random.default_rng(seed)
    q = rng.normal(scale=sigma, size=(1, length, heads, dim)).astype("float32")
    k = rng.normal(scale=sigma, size=(1, length, heads, dim)).astype("float32")
    v = rng.normal(size=(1, length, heads, dim)).astype("float32")
    s = np.einsum("bthd,bshd->bhts", q, k).astype("float64") / math.sqrt(dim)
    rows = []
    for causal in (False, True):
        scores = np.where(np.tril(np.ones((length, length), bool)), s, -np.inf) if causal else s
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        exact = np.einsum("bhts,bshd->bthd", p, v)
        for name in PRECISION_MAPS:
            for num in nums:
                errs = {policy: [] for policy in PRECISIONS}
                for d in range(draws):
                    proj = random_features_matrix(num, dim, seed=31 * d + 7)
                    for policy, (dtype, matmul_dtype) in PRECISIONS.items():
                        args = [ops.cast(x, dtype) for x in (q, k, v)]
                        out = favor_attention(
                            *args, name, proj, causal=causal, matmul_dtype=matmul_dtype
                        )
                        out = np.asarray(ops.cast(out, "float32"), dtype="float64")
                        errs[policy].append(np.linalg.norm(out - exact) / np.linalg.norm(exact))
                row = {"map": name, "M": num, "causal": causal}
                for policy, e in errs.items():
                    row[policy] = float(np.mean(e))
                for policy in ("mixed_bfloat16", "mixed_float16"):
                    row[f"{policy}_over_float32"] = row[policy] / row["float32"]
                rows.append(row)
    return rows


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(ALL_MAPS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    regimes = list(results["kernel"])
    fig, axes = plt.subplots(1, len(regimes) + 1, figsize=(5 * (len(regimes) + 1), 4.5))
    for ax, regime in zip(axes, regimes):
        rows = results["kernel"][regime]
        for name in SOFTMAX_MAPS:
            for kind, style in (("orthogonal", "-"), ("iid", "--")):
                sel = [r for r in rows if r["map"] == name and r["features"] == kind]
                ax.plot(
                    [r["M"] for r in sel],
                    [r["relative_mse"] for r in sel],
                    style,
                    color=colors[name],
                    marker=".",
                    label=f"{name} {kind}",
                )
        ax.set_title(f"kernel relative MSE, {regime}")
    axes[0].legend(fontsize=7)
    ax = axes[-1]
    styles = dict(zip(results["attention"], ("-", "--", ":")))
    for regime, rows in results["attention"].items():
        for name in ALL_MAPS:
            sel = [r for r in rows if r["map"] == name and r["M"]]
            if sel:
                ax.plot(
                    [r["M"] for r in sel],
                    [r["relative_error"] for r in sel],
                    styles[regime],
                    color=colors[name],
                    marker=".",
                    label=f"{name} {regime}",
                )
    ax.set_title("attention output relative error (L=256)")
    ax.legend(fontsize=6)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("random features M")
        ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def print_precision(precision, nums):
    """The per-policy error table and the worst bfloat16 / float32 ratio (goal ≤ 1.1)."""
    worst = {}
    for regime, rows in precision.items():
        print(f"\n== {regime}: attention-output relative error per policy (L=256)")
        print(
            f"{'map':<20} {'causal':>6} {'M':>5} | {'float32':>8} {'bf16':>8} {'f16':>8} | "
            f"{'bf16/f32':>8} {'f16/f32':>8}"
        )
        for r in rows:
            print(
                f"{r['map']:<20} {str(r['causal']):>6} {r['M']:>5} | {r['float32']:8.4f} "
                f"{r['mixed_bfloat16']:8.4f} {r['mixed_float16']:8.4f} | "
                f"{r['mixed_bfloat16_over_float32']:8.3f} {r['mixed_float16_over_float32']:8.3f}"
            )
            for policy in ("mixed_bfloat16", "mixed_float16"):
                worst[policy] = max(worst.get(policy, 0.0), r[f"{policy}_over_float32"])
    for policy, ratio in worst.items():
        print(f"worst {policy} / float32 error ratio over every regime, map and M: {ratio:.3f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few draws, for a smoke run")
    parser.add_argument("--dim", type=int, default=64)
    args = parser.parse_args(argv)
    nums = [16, 64, 256] if args.quick else [16, 32, 64, 128, 256, 512]
    draws = 3 if args.quick else 30
    bias_draws = 200 if args.quick else 2000
    regimes = {"sigma=0.25": 0.25, "sigma=0.5": 0.5, "sigma=1.0": 1.0}
    results = {
        "info": run_info(
            dim=args.dim, nums=nums, draws=draws, bias_draws=bias_draws, regimes=regimes
        ),
        "kernel": {},
        "attention": {},
        "bias": {},
        "precision": {},
    }
    for regime, sigma in regimes.items():
        results["kernel"][regime] = kernel_mse(args.dim, sigma, nums, draws, pairs=512)
        results["attention"][regime] = attention_error(args.dim, sigma, nums, draws)
        results["bias"][regime] = estimator_bias(args.dim, sigma, 256, bias_draws)
        results["precision"][regime] = precision_error(args.dim, sigma, nums, max(3, draws // 3))

    for regime in regimes:
        print(f"\n== {regime} (H={args.dim}) kernel relative MSE")
        rows = results["kernel"][regime]
        print("map".ljust(22) + "".join(f"M={n}".rjust(11) for n in nums) + "   ortho/iid @M=256")
        for name in SOFTMAX_MAPS:
            for kind in ("orthogonal", "iid"):
                vals = [
                    r["relative_mse"] for r in rows if r["map"] == name and r["features"] == kind
                ]
                print(
                    f"{name[:12]} {kind[:5]}".ljust(22) + "".join(f"{v:11.3g}" for v in vals),
                    end="",
                )
                if kind == "iid":
                    o = [
                        r
                        for r in rows
                        if r["map"] == name and r["features"] == "orthogonal" and r["M"] == 256
                    ]
                    i = [
                        r
                        for r in rows
                        if r["map"] == name and r["features"] == "iid" and r["M"] == 256
                    ]
                    print(f"   {o[0]['relative_mse'] / i[0]['relative_mse']:.3f}", end="")
                print()
        print("-- attention output relative error (L=256, non-causal)")
        for name in ALL_MAPS:
            sel = [r for r in results["attention"][regime] if r["map"] == name]
            print(name.ljust(22) + "".join(f"{r['relative_error']:11.3g}" for r in sel))
        print(
            f"-- positive estimator bias at M=256 over {bias_draws} draws (relative, z = bias/stderr)"
        )
        for kind, b in results["bias"][regime].items():
            print(
                f"{kind.ljust(12)} bias={b['relative_bias']:+.4f} ± {b['standard_error']:.4f}  z={b['z']:+.1f}"
            )
    print_precision(results["precision"], nums)
    write_json("approximation", results)
    os.makedirs(RESULTS_DIR, exist_ok=True)
    plot(results, os.path.join(RESULTS_DIR, "approximation.png"))
    print(
        f"\nwrote {os.path.join('benchmarks', 'results', 'approximation.json')} and approximation.png"
    )
    return results


if __name__ == "__main__":
    main()
