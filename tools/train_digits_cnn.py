"""Train a small CNN on scikit-learn's digits in pure numpy and export it to ONNX.

    python tools/train_digits_cnn.py [OUT]      # default tests/fixtures/digits_cnn.onnx

Architecture (NCHW, input ``image`` [batch, 1, 8, 8] = pixel / 16):

    Conv(1->16, 3x3, pad 1) + BatchNorm + ReLU      8x8
    Conv(16->32, 3x3, pad 1) + BatchNorm + ReLU     8x8
    MaxPool 2x2                                     4x4
    Conv(32->32, 3x3, pad 1) + ReLU                 4x4
    Flatten -> Gemm(512 -> 10)                      ``logits`` [batch, 10]

BatchNormalization stays a separate node in the export (running mean/var, eps 1e-5), so the
fixture exercises BN folding. Convolutions run as im2col + matmul. Adam, fixed seed, deterministic.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgec.models.digits import load_split

SEED = 0
EPOCHS = 30
BATCH = 32
LR = 2e-3
EPS = 1e-5        # BatchNorm epsilon
MOMENTUM = 0.1    # BatchNorm running-stat update (PyTorch convention)
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- layers (forward + backward)
def im2col(x):
    """(N,C,H,W) -> (N*H*W, C*9) patches of a 3x3 stride-1 pad-1 convolution."""
    n, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    cols = np.stack([xp[:, :, i:i + h, j:j + w] for i in range(3) for j in range(3)], axis=2)
    return cols.transpose(0, 3, 4, 1, 2).reshape(n * h * w, c * 9)


def col2im(dcols, shape):
    n, c, h, w = shape
    dcols = dcols.reshape(n, h, w, c, 9).transpose(0, 3, 4, 1, 2)   # (N,C,9,H,W)
    dxp = np.zeros((n, c, h + 2, w + 2), dcols.dtype)
    for k in range(9):
        i, j = divmod(k, 3)
        dxp[:, :, i:i + h, j:j + w] += dcols[:, :, k]
    return dxp[:, :, 1:-1, 1:-1]


def conv_fwd(x, w, b):
    n, _, h, wd = x.shape
    cols = im2col(x)
    out = cols @ w.reshape(len(w), -1).T + b
    return out.reshape(n, h, wd, -1).transpose(0, 3, 1, 2), (x.shape, cols, w)


def conv_bwd(dy, cache):
    shape, cols, w = cache
    dy = dy.transpose(0, 2, 3, 1).reshape(-1, len(w))
    dw = (dy.T @ cols).reshape(w.shape)
    dx = col2im(dy @ w.reshape(len(w), -1), shape)
    return dx, dw, dy.sum(0)


def bn_fwd(x, gamma, beta, stats, train):
    if train:
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3))
        m = x.size // x.shape[1]
        stats["mean"] += MOMENTUM * (mean - stats["mean"])
        stats["var"] += MOMENTUM * (var * m / (m - 1) - stats["var"])
    else:
        mean, var = stats["mean"], stats["var"]
    inv = 1.0 / np.sqrt(var + EPS)
    xhat = (x - mean[:, None, None]) * inv[:, None, None]
    return gamma[:, None, None] * xhat + beta[:, None, None], (xhat, inv, gamma)


def bn_bwd(dy, cache):
    xhat, inv, gamma = cache
    m = dy.size // dy.shape[1]
    dgamma, dbeta = (dy * xhat).sum((0, 2, 3)), dy.sum((0, 2, 3))
    dx = (gamma * inv)[:, None, None] / m * (
        m * dy - dbeta[:, None, None] - xhat * dgamma[:, None, None])
    return dx, dgamma, dbeta


def pool_fwd(x):
    n, c, h, w = x.shape
    win = x.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, h // 2, w // 2, 4)
    idx = win.argmax(-1)[..., None]
    return np.take_along_axis(win, idx, -1)[..., 0], (x.shape, idx)


def pool_bwd(dy, cache):
    (n, c, h, w), idx = cache
    dwin = np.zeros((n, c, h // 2, w // 2, 4), dy.dtype)
    np.put_along_axis(dwin, idx, dy[..., None], -1)
    return dwin.reshape(n, c, h // 2, w // 2, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, h, w)


# ---------------------------------------------------------------- model
def init_params(rng):
    def he(*shape):
        fan_in = int(np.prod(shape[1:]))
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    def bias(n, fan_in):  # PyTorch's default; a bias before BatchNorm gets no gradient and keeps it
        return rng.uniform(-1, 1, n).astype(np.float32) / np.sqrt(fan_in)

    z, o = (lambda k: np.zeros(k, np.float32)), (lambda k: np.ones(k, np.float32))
    return {
        "conv1.w": he(16, 1, 3, 3), "conv1.b": bias(16, 9), "bn1.gamma": o(16), "bn1.beta": z(16),
        "conv2.w": he(32, 16, 3, 3), "conv2.b": bias(32, 144), "bn2.gamma": o(32), "bn2.beta": z(32),
        "conv3.w": he(32, 32, 3, 3), "conv3.b": bias(32, 288),
        "fc.w": he(10, 512) / np.sqrt(2.0), "fc.b": z(10),
    }


def init_stats():
    return {f"bn{i}": {"mean": np.zeros(c, np.float32), "var": np.ones(c, np.float32)}
            for i, c in ((1, 16), (2, 32))}


def forward(p, stats, x, train):
    caches = []
    h = x
    for i in (1, 2):
        h, c_conv = conv_fwd(h, p[f"conv{i}.w"], p[f"conv{i}.b"])
        h, c_bn = bn_fwd(h, p[f"bn{i}.gamma"], p[f"bn{i}.beta"], stats[f"bn{i}"], train)
        caches += [c_conv, c_bn, h > 0]
        h = np.maximum(h, 0)
    h, c_pool = pool_fwd(h)
    h, c_conv3 = conv_fwd(h, p["conv3.w"], p["conv3.b"])
    caches += [c_pool, c_conv3, h > 0]
    h = np.maximum(h, 0).reshape(len(x), -1)
    caches.append(h)
    return h @ p["fc.w"].T + p["fc.b"], caches


def backward(p, caches, dlogits):
    c1, bn1, r1, c2, bn2, r2, pool, c3, r3, flat = caches
    g = {"fc.w": dlogits.T @ flat, "fc.b": dlogits.sum(0)}
    dh = (dlogits @ p["fc.w"]).reshape(r3.shape) * r3
    dh, g["conv3.w"], g["conv3.b"] = conv_bwd(dh, c3)
    dh = pool_bwd(dh, pool)
    for i, (c, bn, r) in ((2, (c2, bn2, r2)), (1, (c1, bn1, r1))):
        dh, g[f"bn{i}.gamma"], g[f"bn{i}.beta"] = bn_bwd(dh * r, bn)
        dh, g[f"conv{i}.w"], g[f"conv{i}.b"] = conv_bwd(dh, c)
    return g


def predict(p, stats, x):
    return np.concatenate([forward(p, stats, x[i:i + 256], False)[0] for i in range(0, len(x), 256)])


def train(x_train, y_train, x_test, y_test):
    rng = np.random.default_rng(SEED)
    p, stats = init_params(rng), init_stats()
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(v) for k, v in p.items()}
    step = 0
    for epoch in range(EPOCHS):
        lr = LR * 0.5 * (1 + np.cos(np.pi * epoch / EPOCHS))      # cosine decay
        order = rng.permutation(len(x_train))
        loss = 0.0
        for i in range(0, len(order), BATCH):
            idx = order[i:i + BATCH]
            logits, caches = forward(p, stats, x_train[idx], True)
            z = logits - logits.max(1, keepdims=True)
            prob = np.exp(z) / np.exp(z).sum(1, keepdims=True)
            loss += -np.log(prob[np.arange(len(idx)), y_train[idx]] + 1e-12).sum()
            prob[np.arange(len(idx)), y_train[idx]] -= 1
            grads = backward(p, caches, (prob / len(idx)).astype(np.float32))
            step += 1
            for k, g in grads.items():                              # Adam
                m[k] = 0.9 * m[k] + 0.1 * g
                v[k] = 0.999 * v[k] + 0.001 * g * g
                mh, vh = m[k] / (1 - 0.9 ** step), v[k] / (1 - 0.999 ** step)
                p[k] -= (lr * mh / (np.sqrt(vh) + 1e-8)).astype(np.float32)
        acc = (predict(p, stats, x_test).argmax(1) == y_test).mean()
        print(f"epoch {epoch + 1:2d}  loss {loss / len(order):.4f}  test acc {acc:.4f}")
    return p, stats


# ---------------------------------------------------------------- ONNX export
def export(p, stats, test_accuracy: float, path: Path) -> onnx.ModelProto:
    inits = {k.replace(".", "_"): v for k, v in p.items()}
    for bn, s in stats.items():
        inits[f"{bn}_mean"], inits[f"{bn}_var"] = s["mean"], s["var"]
    conv = dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1])
    nodes = []
    h = "image"
    for i in (1, 2):
        nodes += [
            helper.make_node("Conv", [h, f"conv{i}_w", f"conv{i}_b"], [f"conv{i}"], f"conv{i}", **conv),
            helper.make_node("BatchNormalization",
                             [f"conv{i}", f"bn{i}_gamma", f"bn{i}_beta", f"bn{i}_mean", f"bn{i}_var"],
                             [f"bn{i}"], f"bn{i}", epsilon=EPS),
            helper.make_node("Relu", [f"bn{i}"], [f"relu{i}"], f"relu{i}"),
        ]
        h = f"relu{i}"
    nodes += [
        helper.make_node("MaxPool", [h], ["pool"], "pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["pool", "conv3_w", "conv3_b"], ["conv3"], "conv3", **conv),
        helper.make_node("Relu", ["conv3"], ["relu3"], "relu3"),
        helper.make_node("Flatten", ["relu3"], ["flat"], "flatten", axis=1),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], "fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "digits_cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                              producer_name="edgec tools/train_digits_cnn.py")
    model.ir_version = 8
    model.doc_string = "Small CNN on sklearn digits (8x8 grey, pixel/16), trained in numpy; BatchNorm unfolded."
    helper.set_model_props(model, {
        "dataset": "sklearn.load_digits",
        "preprocess": "x/16",
        "split": "train_test_split(test_size=0.2, stratify=y, random_state=0)",
        "test_accuracy": f"{test_accuracy:.4f}",
    })
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return model


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "tests/fixtures/digits_cnn.onnx"
    x_train, y_train, x_test, y_test = load_split()
    t0 = time.perf_counter()
    p, stats = train(x_train, y_train, x_test, y_test)
    seconds = time.perf_counter() - t0
    correct = int((predict(p, stats, x_test).argmax(1) == y_test).sum())
    acc = correct / len(y_test)
    export(p, stats, acc, out)
    print(f"trained in {seconds:.1f} s; test accuracy {correct}/{len(y_test)} = {acc:.4f}; "
          f"wrote {out} ({out.stat().st_size / 1024:.1f} KiB)")


if __name__ == "__main__":
    main()
