"""Networks of idm_jax.nn.models against hand-derived parameter counts and shapes, a NumPy
re-implementation of the ConvNet forward pass, PyTorch's BatchNorm update rule and PyTorch's
default initialisation.

Speed: random initialisation compiles one threefry kernel per parameter shape, which is slow on
CPU, so most tests fill parameters from NumPy (``numpy_variables``) and only the initialisation
test draws them with ``init_variables``. Parameter counts and output shapes of the big networks
use ``jax.eval_shape`` (no allocation, no compilation).
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idm_jax.nn import models

EPS = 1e-5


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def variable_shapes(model, image_shape):
    return jax.eval_shape(
        lambda k: model.init(k, jnp.zeros((1,) + tuple(image_shape)), train=False),
        jax.random.PRNGKey(0))


def numpy_variables(model, image_shape, seed=0):
    """Variables with the model's structure, filled from NumPy: kernels N(0, 1/fan_in),
    biases and norm shifts N(0, 0.1^2), norm scales 1 + N(0, 0.1^2), running means N(0, 0.1^2),
    running variances U(0.5, 1.5). Non-trivial affine and running statistics on purpose."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        shape = leaf.shape
        if name == "kernel":
            value = rng.normal(size=shape) / math.sqrt(math.prod(shape[:-1]))
        elif name == "scale":
            value = 1.0 + 0.1 * rng.normal(size=shape)
        elif name == "var":
            value = rng.uniform(0.5, 1.5, size=shape)
        else:  # bias, mean
            value = 0.1 * rng.normal(size=shape)
        return jnp.asarray(value, jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, variable_shapes(model, image_shape))


def normal(seed, shape):
    """Standard-normal float32 input from NumPy (jax.random would compile per shape)."""
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def to_np(tree):
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


def np_conv(x, kernel, bias, pad):
    """Stride-1 cross-correlation, NHWC input, (kh, kw, cin, cout) kernel, zero padding."""
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    kh, kw = kernel.shape[:2]
    win = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(1, 2))
    out = np.einsum("nhwcij,ijco->nhwo", win, kernel)
    return out if bias is None else out + bias


def np_pool(x, kind):
    if kind == "none":
        return x
    n, h, w, c = x.shape
    x = x[:, : 2 * (h // 2), : 2 * (w // 2)].reshape(n, h // 2, 2, w // 2, 2, c)
    return x.mean(axis=(2, 4)) if kind == "avgpool" else x.max(axis=(2, 4))


def np_standardise(x, axes):
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    return (x - mean) / np.sqrt(var + EPS)


def np_norm(kind, x, p):
    if kind == "none":
        return x
    if kind == "instancenorm":
        y = np_standardise(x, (1, 2))
    elif kind == "batchnorm":  # train mode: batch statistics, biased variance
        y = np_standardise(x, (0, 1, 2))
    elif kind == "layernorm":
        y = np_standardise(x, (1, 2, 3))
    elif kind == "groupnorm":
        n, h, w, c = x.shape
        y = np_standardise(x.reshape(n, h, w, 4, c // 4), (1, 2, 4)).reshape(x.shape)
    return y * p["scale"] + p["bias"]


NP_ACTS = {
    "relu": lambda x: np.maximum(x, 0.0),
    "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)),
    "leakyrelu": lambda x: np.where(x > 0, x, 0.01 * x),
    "swish": lambda x: x / (1.0 + np.exp(-x)),
}


def np_convnet(params, x, depth, norm, act, pool):
    """NumPy ConvNet: DC's layer order, first padding 3 for 1-channel input, NHWC flatten."""
    h = np.asarray(x, np.float64)
    pad0 = 3 if x.shape[-1] == 1 else 1
    for d in range(depth):
        conv = params[f"conv_{d}"]
        h = np_conv(h, conv["kernel"], conv["bias"], pad0 if d == 0 else 1)
        if norm != "none":
            h = np_norm(norm, h, params[f"norm_{d}"])
        h = np_pool(NP_ACTS[act](h), pool)
    emb = h.reshape(h.shape[0], -1)
    return emb, emb @ params["classifier"]["kernel"] + params["classifier"]["bias"]


# ---------------------------------------------------------------------------------------------
# Parameter counts (PyTorch numbers by per-layer arithmetic)
# ---------------------------------------------------------------------------------------------

def conv_p(cin, cout, k, bias=True):
    return cin * k * k * cout + (cout if bias else 0)


def norm_p(c):  # affine scale + shift per channel (GroupNorm, BatchNorm)
    return 2 * c


def fc_p(i, o):
    return i * o + o


def resnet18_count(norm_params, final_features, classes, cin=3):
    total = conv_p(cin, 64, 3, bias=False) + norm_params(64)
    in_planes = 64
    for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for b in range(2):
            s = stride if b == 0 else 1
            total += conv_p(in_planes, planes, 3, False) + norm_params(planes)
            total += conv_p(planes, planes, 3, False) + norm_params(planes)
            if s != 1 or in_planes != planes:
                total += conv_p(in_planes, planes, 1, False) + norm_params(planes)
            in_planes = planes
    return total + fc_p(final_features, classes)


CONVNET3_CIFAR = (conv_p(3, 128, 3) + norm_p(128) + 2 * (conv_p(128, 128, 3) + norm_p(128))
                  + fc_p(128 * 4 * 4, 10))
CONVNET6_224 = (conv_p(3, 128, 3) + norm_p(128) + 5 * (conv_p(128, 128, 3) + norm_p(128))
                + fc_p(128 * 3 * 3, 100))
ALEXNET_CONVS = [(3, 128, 5), (128, 192, 5), (192, 256, 3), (256, 192, 3), (192, 192, 3)]
ALEXNET = sum(conv_p(*c) for c in ALEXNET_CONVS) + fc_p(192 * 4 * 4, 10)
ALEXNET_BN = ALEXNET + sum(norm_p(c[1]) for c in ALEXNET_CONVS)
VGG11_CONVS = [(3, 64), (64, 128), (128, 256), (256, 256), (256, 512), (512, 512), (512, 512),
               (512, 512)]
VGG11 = sum(conv_p(i, o, 3) + norm_p(o) for i, o in VGG11_CONVS) + fc_p(512, 10)
RESNET18 = resnet18_count(norm_p, 512, 10)
RESNET18_AP = resnet18_count(norm_p, 512 * 4 * 4, 10)
LENET = conv_p(3, 6, 5) + conv_p(6, 16, 5) + fc_p(16 * 5 * 5, 120) + fc_p(120, 84) + fc_p(84, 10)
MLP = fc_p(32 * 32 * 3, 128) + fc_p(128, 128) + fc_p(128, 10)


def test_hand_counts_match_known_pytorch_totals():
    # Published/known totals: DC ConvNet-3 on CIFAR-10 and the CIFAR ResNet18 / VGG11.
    assert CONVNET3_CIFAR == 320_010
    assert CONVNET6_224 == 858_340
    assert RESNET18 == 11_173_962
    assert VGG11 == 9_231_114


@pytest.mark.parametrize("name, image_shape, classes, expected", [
    ("ConvNet", (32, 32, 3), 10, CONVNET3_CIFAR),
    ("ConvNet", (28, 28, 1), 10, CONVNET3_CIFAR - conv_p(3, 128, 3) + conv_p(1, 128, 3)),
    ("ConvNet_6", (224, 224, 3), 100, CONVNET6_224),
    ("ConvNetBN", (32, 32, 3), 10, CONVNET3_CIFAR),
    # LayerNorm([C, H, W]) has an affine pair per element of the pre-pooling map.
    ("ConvNetLN", (32, 32, 3), 10, CONVNET3_CIFAR - 3 * norm_p(128)
     + norm_p(128 * 32 * 32) + norm_p(128 * 16 * 16) + norm_p(128 * 8 * 8)),
    ("ConvNetNN", (32, 32, 3), 10, CONVNET3_CIFAR - 3 * norm_p(128)),
    ("ConvNetNP", (32, 32, 3), 10, CONVNET3_CIFAR - fc_p(2048, 10) + fc_p(128 * 32 * 32, 10)),
    ("ConvNetW32", (32, 32, 3), 10, conv_p(3, 32, 3) + 2 * conv_p(32, 32, 3) + 3 * norm_p(32)
     + fc_p(32 * 16, 10)),
    ("ConvNetD1", (32, 32, 3), 10, conv_p(3, 128, 3) + norm_p(128) + fc_p(128 * 16 * 16, 10)),
    ("AlexNet", (32, 32, 3), 10, ALEXNET),
    ("AlexNetBN", (32, 32, 3), 10, ALEXNET_BN),
    ("VGG11", (32, 32, 3), 10, VGG11),
    ("VGG11BN", (32, 32, 3), 10, VGG11),
    ("ResNet18", (32, 32, 3), 10, RESNET18),
    ("ResNet18BN", (32, 32, 3), 10, RESNET18),
    ("ResNet18_AP", (32, 32, 3), 10, RESNET18_AP),
    ("ResNet18BN_AP", (32, 32, 3), 10, RESNET18_AP),
    ("LeNet", (32, 32, 3), 10, LENET),
    ("MLP", (32, 32, 3), 10, MLP),
])
def test_param_counts_equal_pytorch(name, image_shape, classes, expected):
    model = models.get_model(name, classes, in_channels=image_shape[-1])
    shapes = variable_shapes(model, image_shape)
    assert models.count_params(shapes["params"]) == expected


# ---------------------------------------------------------------------------------------------
# Output shapes
# ---------------------------------------------------------------------------------------------

# Embedding sizes derived by hand (see the module docstring for the padding rules):
# ConvNet: 28x28x1 -> conv pad 3 -> 32 -> 16 -> 8 -> 4: 128*16; 64 px: 128*8*8.
# AlexNet: 28x28x1 -> 5x5 pad 4 -> 32 -> ... -> 4x4x192; 64 px -> 8x8x192.
# VGG11: five pools: 32 -> 1 (512); 64 -> 2x2x512. ResNet18: 32/28 -> 4 -> pool 4 -> 1x1x512;
# 64 -> 8 -> 2x2x512. ResNet18_AP: 28 -> 14 -> 7 -> 3 (floor): 3x3x512; 32 -> 4x4x512;
# 64 -> 8x8x512. LeNet: 84, MLP: 128 (input of the last linear layer).
EMBED_DIMS = {
    "ConvNet": {28: 2048, 32: 2048, 64: 8192},
    "ConvNetBN": {28: 2048, 32: 2048, 64: 8192},
    "AlexNet": {28: 3072, 32: 3072, 64: 12288},
    "AlexNetBN": {28: 3072, 32: 3072, 64: 12288},
    "VGG11": {28: 512, 32: 512, 64: 2048},
    "VGG11BN": {28: 512, 32: 512, 64: 2048},
    "ResNet18": {28: 512, 32: 512, 64: 2048},
    "ResNet18BN": {28: 512, 32: 512, 64: 2048},
    "ResNet18_AP": {28: 4608, 32: 8192, 64: 32768},
    "ResNet18BN_AP": {28: 4608, 32: 8192, 64: 32768},
    "LeNet": {28: 84, 32: 84, 64: 84},
    "MLP": {28: 128, 32: 128, 64: 128},
}
SHAPE_CASES = [(name, size) for name in EMBED_DIMS for size in (28, 32, 64)]


@pytest.mark.parametrize("name, size", SHAPE_CASES)
def test_output_shapes(name, size):
    channels = 1 if size == 28 else 3
    model = models.get_model(name, 7, in_channels=channels)
    x = jax.ShapeDtypeStruct((3, size, size, channels), jnp.float32)
    shapes = variable_shapes(model, x.shape[1:])
    emb, logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), shapes, x)
    assert emb.shape == (3, EMBED_DIMS[name][size])
    assert logits.shape == (3, 7)
    assert emb.dtype == logits.dtype == jnp.float32


def test_convnet6_at_224():
    full = models.get_model("ConvNet_6", 100)
    shapes = variable_shapes(full, (224, 224, 3))
    emb, logits = jax.eval_shape(lambda v, x: full.apply(v, x), shapes,
                                 jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32))
    assert emb.shape == (2, 128 * 3 * 3) and logits.shape == (2, 100)
    # A real forward of the same depth-6 stack at width 4: 224 -> ... -> 7 -> 3 (floor).
    small = models.ConvNet(num_classes=5, width=4, depth=6)
    variables = numpy_variables(small, (224, 224, 3))
    x = normal(0, (1, 224, 224, 3))
    emb, logits = jax.jit(small.apply)(variables, x)
    chex.assert_shape(emb, (1, 4 * 3 * 3))
    chex.assert_shape(logits, (1, 5))
    chex.assert_tree_all_finite((emb, logits))


def test_too_small_input_and_bad_rank_raise():
    model = models.get_model("ConvNet_6", 10)  # 32 -> 16 -> 8 -> 4 -> 2 -> 1 -> cannot pool
    with pytest.raises(ValueError, match="too small"):
        variable_shapes(model, (32, 32, 3))
    with pytest.raises(ValueError, match="at least 25x25"):
        variable_shapes(models.get_model("ResNet18", 10), (16, 16, 3))
    with pytest.raises(ValueError, match="NHWC"):
        jax.eval_shape(lambda: models.ConvNet(10).init(jax.random.PRNGKey(0),
                                                       jnp.zeros((32, 32, 3))))


# ---------------------------------------------------------------------------------------------
# Forward pass against NumPy
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm, act, pool, depth, image_shape", [
    ("instancenorm", "relu", "avgpool", 2, (7, 7, 3)),     # 7 -> 3 -> 1: floor pooling
    ("instancenorm", "relu", "avgpool", 3, (6, 6, 1)),  # 1 channel: pad 3, 8 -> 4 -> 2 -> 1
    ("batchnorm", "swish", "maxpool", 2, (8, 8, 3)),       # train mode, batch statistics
    ("layernorm", "sigmoid", "avgpool", 2, (8, 8, 2)),
    ("groupnorm", "leakyrelu", "none", 1, (5, 5, 3)),
    ("none", "relu", "maxpool", 2, (9, 9, 3)),
])
def test_convnet_matches_numpy(norm, act, pool, depth, image_shape):
    model = models.ConvNet(num_classes=6, width=8, depth=depth, norm=norm, act=act, pool=pool)
    variables = numpy_variables(model, image_shape, seed=1)
    x = normal(2, (5,) + image_shape)
    if norm == "batchnorm":
        (emb, logits), _ = jax.jit(lambda v, x: model.apply(v, x, train=True,
                                                             mutable=["batch_stats"]))(variables, x)
    else:
        emb, logits = jax.jit(model.apply)(variables, x)
    want_emb, want_logits = np_convnet(to_np(variables["params"]), np.asarray(x), depth, norm,
                                       act, pool)
    np.testing.assert_allclose(np.asarray(emb), want_emb, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(logits), want_logits, rtol=1e-4, atol=1e-4)
    # The logits are the linear classifier applied to exactly the returned embedding.
    cls = to_np(variables["params"]["classifier"])
    np.testing.assert_allclose(np.asarray(logits),
                               np.asarray(emb, np.float64) @ cls["kernel"] + cls["bias"],
                               rtol=1e-4, atol=1e-4)


class InstanceNormTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_per_sample_per_channel_standardisation(self):
        # Depth 1 and no pooling: the embedding is leaky-ReLU(norm(conv(x))), flattened.
        model = models.ConvNet(num_classes=3, width=4, depth=1, norm="instancenorm",
                               act="leakyrelu", pool="none")
        variables = numpy_variables(model, (6, 6, 3), seed=3)
        x = 3.0 * normal(4, (2, 6, 6, 3)) + 1.0
        emb, _ = self.variant(model.apply)(variables, x)
        p = to_np(variables["params"])
        conv = np_conv(np.asarray(x, np.float64), p["conv_0"]["kernel"], p["conv_0"]["bias"], 1)
        want = np.empty_like(conv)
        for n in range(conv.shape[0]):
            for c in range(conv.shape[-1]):
                plane = conv[n, :, :, c]
                want[n, :, :, c] = ((plane - plane.mean()) / np.sqrt(plane.var() + EPS)
                                    * p["norm_0"]["scale"][c] + p["norm_0"]["bias"][c])
        want = np.where(want > 0, want, 0.01 * want)
        np.testing.assert_allclose(np.asarray(emb), want.reshape(2, -1), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# BatchNorm: PyTorch semantics and masking
# ---------------------------------------------------------------------------------------------

def _bn_convnet():
    return models.ConvNet(num_classes=4, width=6, depth=1, norm="batchnorm", pool="none")


def test_batchnorm_train_updates_running_stats_like_pytorch():
    model = _bn_convnet()
    variables = numpy_variables(model, (5, 5, 3), seed=5)
    x = 2.0 * normal(6, (4, 5, 5, 3)) + 0.5
    (emb, _), updates = jax.jit(
        lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    p = to_np(variables["params"])
    old = to_np(variables["batch_stats"]["norm_0"])
    conv = np_conv(np.asarray(x, np.float64), p["conv_0"]["kernel"], p["conv_0"]["bias"], 1)
    flat = conv.reshape(-1, conv.shape[-1])
    want_mean = 0.9 * old["mean"] + 0.1 * flat.mean(axis=0)
    want_var = 0.9 * old["var"] + 0.1 * flat.var(axis=0, ddof=1)  # unbiased, n = 4*5*5
    new = updates["batch_stats"]["norm_0"]
    np.testing.assert_allclose(np.asarray(new["mean"]), want_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(new["var"]), want_var, rtol=1e-5, atol=1e-6)
    # Normalisation itself uses the biased batch variance.
    want = (flat - flat.mean(0)) / np.sqrt(flat.var(0) + EPS) * p["norm_0"]["scale"] \
        + p["norm_0"]["bias"]
    np.testing.assert_allclose(np.asarray(emb), np.maximum(want, 0).reshape(4, -1),
                               rtol=1e-4, atol=1e-5)


def test_batchnorm_eval_uses_running_stats_and_changes_nothing():
    model = _bn_convnet()
    variables = numpy_variables(model, (5, 5, 3), seed=7)
    x = normal(8, (3, 5, 5, 3))
    emb, _ = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    p = to_np(variables["params"])
    stats = to_np(variables["batch_stats"]["norm_0"])
    conv = np_conv(np.asarray(x, np.float64), p["conv_0"]["kernel"], p["conv_0"]["bias"], 1)
    want = (conv - stats["mean"]) / np.sqrt(stats["var"] + EPS) * p["norm_0"]["scale"] \
        + p["norm_0"]["bias"]
    np.testing.assert_allclose(np.asarray(emb), np.maximum(want, 0).reshape(3, -1),
                               rtol=1e-4, atol=1e-5)
    # Eval mode per-sample: a row's output does not depend on the other rows.
    emb0, _ = model.apply(variables, x[:1], train=False)
    np.testing.assert_allclose(np.asarray(emb0), np.asarray(emb[:1]), rtol=1e-5, atol=1e-6)


def test_init_variables_batch_stats_and_key_dependence():
    model = _bn_convnet()
    a = models.init_variables(model, jax.random.PRNGKey(0), (5, 5, 3))
    b = models.init_variables(model, jax.random.PRNGKey(0), (5, 5, 3))
    c = models.init_variables(model, jax.random.PRNGKey(1), (5, 5, 3))
    assert set(a) == {"params", "batch_stats"}
    np.testing.assert_array_equal(np.asarray(a["batch_stats"]["norm_0"]["mean"]), 0.0)
    np.testing.assert_array_equal(np.asarray(a["batch_stats"]["norm_0"]["var"]), 1.0)
    np.testing.assert_array_equal(np.asarray(a["params"]["norm_0"]["scale"]), 1.0)
    np.testing.assert_array_equal(np.asarray(a["params"]["norm_0"]["bias"]), 0.0)
    chex.assert_trees_all_equal(a, b)
    assert not np.allclose(np.asarray(a["params"]["conv_0"]["kernel"]),
                           np.asarray(c["params"]["conv_0"]["kernel"]))
    # Batched initialisation (a queue of models) over a stacked key axis equals one-by-one.
    keys = jnp.stack([jax.random.PRNGKey(0), jax.random.PRNGKey(1)])
    stacked = jax.vmap(lambda k: models.init_variables(model, k, (5, 5, 3)))(keys)
    chex.assert_trees_all_close(jax.tree_util.tree_map(lambda u: u[0], stacked), a)
    chex.assert_trees_all_close(jax.tree_util.tree_map(lambda u: u[1], stacked), c)


def _max_abs_diff(a, b):
    return max(jax.tree_util.tree_leaves(
        jax.tree_util.tree_map(lambda u, v: float(jnp.max(jnp.abs(u - v))), a, b)))


def test_masked_batch_equals_unpadded_batch():
    model = models.ConvNet(num_classes=5, width=6, depth=2, norm="batchnorm")
    variables = numpy_variables(model, (8, 8, 3), seed=9)
    valid = normal(10, (3, 8, 8, 3))
    padded = jnp.concatenate([valid, 50.0 * normal(11, (2, 8, 8, 3)) + 7.0])
    mask = jnp.array([True, True, True, False, False])

    def train_step(v, x, m):
        return model.apply(v, x, train=True, mask=m, mutable=["batch_stats"])

    step = jax.jit(train_step)
    (emb_ref, logits_ref), upd_ref = step(variables, valid, None)
    (emb_pad, logits_pad), upd_pad = step(variables, padded, mask)
    chex.assert_trees_all_close(upd_pad, upd_ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(logits_pad[:3]), np.asarray(logits_ref),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(emb_pad[:3]), np.asarray(emb_ref), rtol=1e-4, atol=1e-5)
    # Without the mask the junk rows do move the statistics: the comparison above can fail.
    (_, _), upd_unmasked = step(variables, padded, None)
    assert _max_abs_diff(upd_unmasked, upd_ref) > 1e-2


@pytest.mark.parametrize("name", ["AlexNetBN", "VGG11BN", "ResNet18BN", "ResNet18BN_AP"])
def test_mask_reaches_every_batchnorm(name):
    # Two batches that differ only in their masked-out rows must give identical running stats
    # and identical outputs for the valid rows in every layer, shortcut norms included. One
    # compiled program serves both calls.
    model = models.get_model(name, 5)
    variables = numpy_variables(model, (32, 32, 3), seed=12)
    valid = normal(13, (3, 32, 32, 3))
    junk_a = jnp.concatenate([valid, jnp.zeros((2, 32, 32, 3))])
    junk_b = jnp.concatenate([valid, 30.0 * normal(14, (2, 32, 32, 3)) - 5.0])
    step = jax.jit(lambda v, x, m: model.apply(v, x, train=True, mask=m,
                                               mutable=["batch_stats"]))
    mask = jnp.array([True, True, True, False, False])
    (emb_a, logits_a), upd_a = step(variables, junk_a, mask)
    (emb_b, logits_b), upd_b = step(variables, junk_b, mask)
    chex.assert_trees_all_close(upd_a, upd_b, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close((emb_a[:3], logits_a[:3]), (emb_b[:3], logits_b[:3]),
                                rtol=1e-4, atol=1e-5)
    # An all-True mask lets the junk in: statistics change, so the check above can fail.
    (_, _), upd_all = step(variables, junk_b, jnp.ones((5,), bool))
    assert _max_abs_diff(upd_all, upd_a) > 1e-2


def test_non_bn_models_ignore_mask_and_train():
    model = models.ConvNet(num_classes=4, width=4, depth=2)
    variables = numpy_variables(model, (8, 8, 3))
    x = normal(11, (3, 8, 8, 3))
    ref = model.apply(variables, x)
    masked = model.apply(variables, x, train=True, mask=jnp.array([True, False, False]))
    chex.assert_trees_all_close(masked, ref)


# ---------------------------------------------------------------------------------------------
# Initialisation
# ---------------------------------------------------------------------------------------------

def test_pytorch_default_init_convnet3():
    model = models.get_model("ConvNet", 10)
    variables = models.init_variables(model, jax.random.PRNGKey(42), (32, 32, 3))
    assert set(variables) == {"params"}
    params = variables["params"]
    for d in range(3):
        np.testing.assert_array_equal(np.asarray(params[f"norm_{d}"]["scale"]), 1.0)
        np.testing.assert_array_equal(np.asarray(params[f"norm_{d}"]["bias"]), 0.0)
    layers = [params[f"conv_{d}"] for d in range(3)] + [params["classifier"]]
    for layer in layers:
        assert layer["kernel"].dtype == layer["bias"].dtype == jnp.float32
        kernel = np.asarray(layer["kernel"], np.float64)
        bias = np.asarray(layer["bias"], np.float64)
        fan_in = math.prod(kernel.shape[:-1])  # kh*kw*cin, or in_features
        bound = 1.0 / math.sqrt(fan_in)
        n = kernel.size
        assert np.abs(kernel).max() <= bound
        assert np.abs(kernel).max() >= 0.99 * bound  # n >= 3456: P(fail) < 1e-15
        assert abs(kernel.mean()) < 5 * bound / math.sqrt(3 * n)
        np.testing.assert_allclose(kernel.var(), bound ** 2 / 3, rtol=0.08)
        # Kolmogorov-Smirnov distance to U(-bound, bound).
        u = np.sort(kernel.ravel())
        cdf = (u + bound) / (2 * bound)
        ks = np.max(np.abs(cdf - np.arange(1, n + 1) / n))
        assert ks < 2.5 / math.sqrt(n)
        assert np.abs(bias).max() <= bound
        assert np.unique(bias).size == bias.size  # drawn, not a constant
    # 128 draws with bound 1/sqrt(27): the bias bound follows the layer's own fan-in.
    conv0_bias = np.asarray(params["conv_0"]["bias"])
    assert np.abs(conv0_bias).max() >= 0.8 / math.sqrt(27)


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

BN_NAMES = {"ConvNetBN", "ConvNet_BN", "ConvNetASwishBN", "AlexNetBN", "VGG11BN", "ResNet18BN",
            "ResNet18BN_AP"}
REQUIRED_NAMES = {
    "ConvNet", "ConvNetD1", "ConvNetD2", "ConvNetD3", "ConvNetD4", "ConvNet_6", "ConvNetW32",
    "ConvNetW64", "ConvNetW128", "ConvNetW256", "ConvNetAS", "ConvNetAR", "ConvNetAL",
    "ConvNetASwish", "ConvNetNN", "ConvNetBN", "ConvNetLN", "ConvNetIN", "ConvNetGN", "ConvNetNP",
    "ConvNetMP", "ConvNetAP", "ConvNet_BN", "ConvNetASwishBN", "AlexNet", "AlexNetBN", "VGG11",
    "VGG11BN", "ResNet18", "ResNet18BN", "ResNet18_AP", "ResNet18BN_AP", "LeNet", "MLP"}


def _smallest_input(name):
    if name == "ConvNet_6":
        return (64, 64, 3)
    if name.startswith("ConvNet"):
        return (16, 16, 3) if name != "ConvNet_5" else (32, 32, 3)
    return (32, 32, 3)


def test_model_names_cover_the_dc_names():
    assert REQUIRED_NAMES <= set(models.MODEL_NAMES)
    assert len(set(models.MODEL_NAMES)) == len(models.MODEL_NAMES)


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_every_name_builds_and_runs(name):
    model = models.get_model(name, 3)
    image_shape = _smallest_input(name)
    variables = numpy_variables(model, image_shape, seed=12)
    assert ("batch_stats" in variables) == (name in BN_NAMES) == models.uses_batch_stats(name)
    x = normal(13, (2,) + image_shape)
    emb, logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    chex.assert_rank(emb, 2)
    chex.assert_shape(logits, (2, 3))
    chex.assert_tree_all_finite((emb, logits))
    assert float(jnp.max(jnp.abs(emb[0] - emb[1]))) > 0  # depends on the input


# Settings of DC/IDM get_network (width, depth, norm, act, pool).
CONVNET_VARIANTS = {
    "ConvNet": (128, 3, "instancenorm", "relu", "avgpool"),
    "ConvNetD1": (128, 1, "instancenorm", "relu", "avgpool"),
    "ConvNetD4": (128, 4, "instancenorm", "relu", "avgpool"),
    "ConvNet_6": (128, 6, "instancenorm", "relu", "avgpool"),
    "ConvNetW32": (32, 3, "instancenorm", "relu", "avgpool"),
    "ConvNetW256": (256, 3, "instancenorm", "relu", "avgpool"),
    "ConvNetAS": (128, 3, "instancenorm", "sigmoid", "avgpool"),
    "ConvNetAL": (128, 3, "instancenorm", "leakyrelu", "avgpool"),
    "ConvNetASwish": (128, 3, "instancenorm", "swish", "avgpool"),
    "ConvNetASwishBN": (128, 3, "batchnorm", "swish", "avgpool"),
    "ConvNetNN": (128, 3, "none", "relu", "avgpool"),
    "ConvNetBN": (128, 3, "batchnorm", "relu", "avgpool"),
    "ConvNet_BN": (128, 3, "batchnorm", "relu", "avgpool"),
    "ConvNetLN": (128, 3, "layernorm", "relu", "avgpool"),
    "ConvNetGN": (128, 3, "groupnorm", "relu", "avgpool"),
    "ConvNetNP": (128, 3, "instancenorm", "relu", "none"),
    "ConvNetMP": (128, 3, "instancenorm", "relu", "maxpool"),
}


@pytest.mark.parametrize("name", sorted(CONVNET_VARIANTS))
def test_convnet_variant_settings(name):
    m = models.get_model(name, 10)
    assert (m.width, m.depth, m.norm, m.act, m.pool) == CONVNET_VARIANTS[name]


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as info:
        models.get_model("ConvNetXL", 10)
    message = str(info.value)
    assert "ConvNetXL" in message
    for name in ("ConvNet", "ConvNet_6", "ResNet18BN", "VGG11"):
        assert name in message


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="norm"):
        models.ConvNet(10, norm="batch")
    with pytest.raises(ValueError, match="activation"):
        models.ConvNet(10, act="gelu")
    with pytest.raises(ValueError, match="pooling"):
        models.ConvNet(10, pool="avgpooling")
    with pytest.raises(ValueError, match="num_classes"):
        models.get_model("ConvNet", 0)
    with pytest.raises(ValueError):
        models.uses_batch_stats(object())
    assert models.uses_batch_stats(models.ConvNet(10, norm="batchnorm"))
    assert not models.uses_batch_stats(models.ResNet18(10))


# ---------------------------------------------------------------------------------------------
# Transformations and precision
# ---------------------------------------------------------------------------------------------

def test_vmap_over_stacked_params_equals_separate_applies():
    model = models.ConvNet(num_classes=4, width=8, depth=2)
    v1 = numpy_variables(model, (8, 8, 3), seed=20)
    v2 = numpy_variables(model, (8, 8, 3), seed=21)
    stacked = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), v1, v2)
    x = normal(22, (5, 8, 8, 3))
    out = jax.jit(jax.vmap(lambda v: model.apply(v, x)))(stacked)
    for i, v in enumerate((v1, v2)):
        ref = model.apply(v, x)
        chex.assert_trees_all_close(jax.tree_util.tree_map(lambda a: a[i], out), ref,
                                    rtol=1e-5, atol=1e-6)


def test_vmap_batchnorm_train_with_mutable_stats():
    model = models.ConvNet(num_classes=4, width=8, depth=2, norm="batchnorm")
    v1 = numpy_variables(model, (8, 8, 3), seed=23)
    v2 = numpy_variables(model, (8, 8, 3), seed=24)
    stacked = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), v1, v2)
    x = normal(25, (2, 6, 8, 8, 3))  # one batch per model

    def train(v, x):
        return model.apply(v, x, train=True, mutable=["batch_stats"])

    out = jax.jit(jax.vmap(train))(stacked, x)
    for i, v in enumerate((v1, v2)):
        ref = train(v, x[i])
        chex.assert_trees_all_close(jax.tree_util.tree_map(lambda a: a[i], out), ref,
                                    rtol=1e-5, atol=1e-6)


def test_jitted_apply_traces_once():
    model = models.ConvNet(num_classes=4, width=4, depth=2)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def forward(v, x):
        return model.apply(v, x)

    x = jnp.ones((2, 8, 8, 3))
    forward(numpy_variables(model, (8, 8, 3), seed=30), x)
    forward(numpy_variables(model, (8, 8, 3), seed=31), 2.0 * x)


def test_bfloat16_compute_keeps_float32_params_and_outputs():
    f32 = models.ConvNet(num_classes=4, width=8, depth=2)
    bf16 = models.ConvNet(num_classes=4, width=8, depth=2, dtype=jnp.bfloat16)
    shapes = variable_shapes(bf16, (8, 8, 3))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(shapes))
    variables = numpy_variables(f32, (8, 8, 3), seed=40)
    x = normal(41, (3, 8, 8, 3))
    emb32, logits32 = f32.apply(variables, x)
    emb16, logits16 = jax.jit(bf16.apply)(variables, x)
    assert emb16.dtype == logits16.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(emb16), np.asarray(emb32), rtol=0.05, atol=0.05)
    np.testing.assert_allclose(np.asarray(logits16), np.asarray(logits32), rtol=0.05, atol=0.05)
