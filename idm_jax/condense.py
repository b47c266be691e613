"""The IDM condensation engine: explicit state, one jitted outer iteration, and the run loop.

One call of the step function is one outer iteration of the official ``IDM_cifar10.py``
(reference 2.8 and 11C): reset meters every ``eval_interval``, push a fresh model every
``net_generate_interval``, draw one extractor, match every class (partition-and-expand, Siamese
DSA, MMD plus class-aware CE), update the images, and train two queue models on real data.
Classes are a vmapped axis; the queue is a stacked pytree; nothing leaves the device.

The official image optimiser takes one SGD step per class, in class order, with the momentum
buffer of the whole tensor (reference 2.3). Class ``c``'s rows only move by momentum before their
own step, so we compute where every class's rows stand at its own step in closed form, get all
class gradients in one batched backward pass, and apply the C sequential steps in closed form.
``sequential_image_update`` is the plain scan it must equal (tested).

The same step runs on one device or, given a ``jax.sharding`` mesh (``idm_jax.sharding``), with
the class axis split over several devices and queue training data-parallel.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator, NamedTuple, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from idm_jax import augment, losses, microbatch, models, partition
from idm_jax import data as data_lib
from idm_jax import queue as queue_lib
from idm_jax import sharding as sharding_lib
from idm_jax._callable_module import make_module_callable
from idm_jax.config import Config


# --------------------------------------------------------------------------- real data on device
@flax.struct.dataclass
class RealData:
    """Real training images kept on the device, class by class.

    ``per_class`` stays uint8 (4x less memory than float; ImageNet-100 fits this way) and is
    normalised batch by batch inside the step. On a device mesh (``sharding.shard_real``) its
    class axis may carry empty padding classes past K up to a multiple of the device count;
    ``counts`` always has exactly K entries and defines K.
    """

    per_class: jax.Array    # (K or K_padded, Nmax, H, W, C) uint8, zero past counts[k]
    counts: jax.Array       # (K,) int32 images per class
    flat_index: jax.Array   # (Ntotal,) int32 index of every real image into K*Nmax
    mean: jax.Array         # (C,) float32, in [0,1] pixel units
    std: jax.Array          # (C,) float32

    @property
    def num_classes(self) -> int:
        return self.counts.shape[0]

    @property
    def class_images(self) -> jax.Array:
        """(K, Nmax, H, W, C) ``per_class`` without any padding classes."""
        k = self.num_classes
        return self.per_class if self.per_class.shape[0] == k else self.per_class[:k]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.per_class.shape[2:])


def prepare_real(images: np.ndarray, labels: np.ndarray, mean, std,
                 num_classes: Optional[int] = None, mesh: Optional[Mesh] = None) -> RealData:
    """Sort a labelled uint8 NHWC image array into the per-class device layout.

    With ``mesh`` (``sharding.make_mesh``) the class axis is split over its devices straight from
    host memory (see ``sharding.shard_real``); without, everything goes to the default device.
    """
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"train images must be a uint8 (N, H, W, C) array, got {images.dtype} "
                         f"{images.shape}; pass raw pixels 0..255, the engine normalises them")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have shape ({images.shape[0]},), got {labels.shape}")
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    if len(mean) != images.shape[-1] or len(std) != images.shape[-1]:
        raise ValueError(f"mean/std need {images.shape[-1]} channels, got {len(mean)}/{len(std)}")
    per_class, counts = data_lib.class_arrays(images, labels, num_classes)
    nmax = per_class.shape[1]
    flat = [k * nmax + np.arange(n) for k, n in enumerate(counts)]
    if mesh is not None:
        return sharding_lib.shard_real(RealData(
            per_class=per_class, counts=counts.astype(np.int32),
            flat_index=np.concatenate(flat).astype(np.int32),
            mean=np.asarray(mean, np.float32), std=np.asarray(std, np.float32)), mesh)
    return RealData(per_class=jnp.asarray(per_class), counts=jnp.asarray(counts, jnp.int32),
                    flat_index=jnp.asarray(np.concatenate(flat), jnp.int32),
                    mean=jnp.asarray(mean, jnp.float32), std=jnp.asarray(std, jnp.float32))


def _to_float(real: RealData, pixels: jax.Array, normalize: bool) -> jax.Array:
    x = pixels.astype(jnp.float32) / 255.0
    return (x - real.mean) / real.std if normalize else x


def class_batch_indices(key: jax.Array, counts: jax.Array, nmax: int, batch: int,
                        sampling: str = "random") -> tuple[jax.Array, jax.Array]:
    """Per-class real batch indices, drawn without replacement within each class.

    Returns (indices (K, batch) into each class's rows, mask (K, batch) bool). A class with fewer
    than ``batch`` images contributes all of them (the rest of its row is masked), as the official
    code uses the whole class then.
    """
    num_classes = counts.shape[0]
    positions = jnp.arange(batch)
    mask = positions[None, :] < counts[:, None]
    if sampling == "first":
        return jnp.broadcast_to(positions, (num_classes, batch)), mask
    scores = jax.random.uniform(key, (num_classes, nmax))
    scores = jnp.where(jnp.arange(nmax)[None, :] < counts[:, None], scores, -1.0)
    _, idx = jax.lax.top_k(scores, batch)   # a uniform random subset, valid rows first
    return idx, mask


def sample_all_classes(real: RealData, key: jax.Array, batch: int, normalize: bool = True):
    """A batch drawn without replacement from the whole train set: (images, labels).

    The ``batch`` images with the largest of iid uniform scores: a uniform random subset in
    random order, like the official ``randperm(N)[:batch]``. ``jax.random.choice(...,
    replace=False)`` draws the same distribution by shuffling all N indices, two sorts of N
    pairs: with N = 50,000 that was 20 ms per draw on the 2-core CPU, 0.4 s of each CIFAR-10
    iteration's 20 queue steps (profiled), against 0.4 ms for this ``top_k``.
    """
    scores = jax.random.uniform(key, real.flat_index.shape)
    picks = real.flat_index[jax.lax.top_k(scores, batch)[1]]
    nmax = real.per_class.shape[1]
    flat = real.per_class.reshape((-1,) + real.image_shape)
    return _to_float(real, flat[picks], normalize), (picks // nmax).astype(jnp.int32)


# --------------------------------------------------------------------------- state
@flax.struct.dataclass
class CondenseState:
    """Everything a run needs to continue; a checkpoint stores exactly this."""

    images: jax.Array        # (K*ipc, H, W, C) float32 synthetic images (normalised space)
    momentum: jax.Array      # same shape, the image optimiser's buffer
    queue: queue_lib.ModelQueue
    key: jax.Array           # (2,) uint32 raw PRNG key
    iteration: jax.Array     # () int32, next outer iteration to run


def synthetic_labels(num_classes: int, ipc: int) -> jnp.ndarray:
    """Fixed hard labels of the stored set: [0]*ipc + [1]*ipc + ..."""
    return jnp.repeat(jnp.arange(num_classes, dtype=jnp.int32), ipc)


class Engine(NamedTuple):
    """The model and functions a run is built from (static: not part of the state)."""

    config: Config
    model: Any
    optimizer: Any
    init_params: Callable
    apply: Callable          # (params, images) -> (embedding, logits)
    chunk: int = 0           # images per network call on a single device (0: whole batch)


def make_engine(config: Config, num_classes: int, image_shape) -> Engine:
    height, width, channels = image_shape
    if height % config.partition_factor or width % config.partition_factor:
        if config.partition_expand or config.init.startswith("mosaic"):
            raise ValueError(f"image size {height}x{width} is not divisible by partition_factor "
                             f"{config.partition_factor}; set partition_expand=False and "
                             f"init='real', or resize the data")
    dtype = jnp.bfloat16 if config.compute_dtype == "bfloat16" else jnp.float32
    model = models.get_model(config.model, num_classes, in_channels=channels, dtype=dtype)
    if models.uses_batch_stats(config.model):
        raise ValueError(f"model {config.model!r} uses BatchNorm, whose running statistics the "
                         f"queue does not track; condense with an instance-norm model such as "
                         f"'ConvNet' (BatchNorm models are fine for evaluation)")
    dummy = jnp.zeros((1,) + tuple(image_shape), jnp.float32)

    def init_params(key):
        return model.init(key, dummy)["params"]

    def apply(params, images):
        embedding, logits = model.apply({"params": params}, images)
        return embedding.astype(jnp.float32), logits.astype(jnp.float32)

    optimizer = queue_lib.net_optimizer(config.lr_net, config.net_momentum,
                                        config.net_weight_decay)
    return Engine(config, model, optimizer, init_params, apply,
                  chunk=microbatch.resolve(config.microbatch))


def init_synthetic(key: jax.Array, config: Config, real: RealData) -> jax.Array:
    """The initial synthetic set (reference 2.2): (K*ipc, H, W, C) float32, normalised space."""
    counts = np.asarray(real.counts)
    num_classes, nmax = real.num_classes, real.per_class.shape[1]
    ipc, shape = config.ipc, real.image_shape
    if config.init == "noise":
        return jax.random.normal(key, (num_classes * ipc,) + shape, jnp.float32)
    if counts.min() < ipc:
        raise ValueError(f"class {int(counts.argmin())} has only {int(counts.min())} real images "
                         f"but ipc={ipc}; lower ipc or use init='noise'")
    draws = {"mosaic": 4, "mosaic_repeat": 1, "real": 1}[config.init]
    draws = config.partition_factor ** 2 if config.init == "mosaic" else draws
    sampling = "first" if config.real_sampling == "first" else "random"
    picks = []
    for draw_key in jax.random.split(key, draws):
        idx, _ = class_batch_indices(draw_key, real.counts, nmax, ipc, sampling)
        picks.append(jnp.take_along_axis(
            real.class_images, idx.reshape(idx.shape + (1, 1, 1)), axis=1))  # (K, ipc, H, W, C)
    pixels = jnp.stack(picks)                                # (draws, K, ipc, H, W, C)
    x = _to_float(real, pixels, config.normalize_train)
    if config.init == "real":
        return x[0].reshape((-1,) + shape)
    if config.init == "mosaic_repeat":
        x = jnp.repeat(x, config.partition_factor ** 2, axis=0)
    x = x.reshape((x.shape[0], num_classes * ipc) + shape)
    return partition.mosaic(x, config.partition_factor)


def init_state(engine: Engine, real: RealData, seed_or_key) -> CondenseState:
    """Fresh state: synthetic init, zero momentum, a queue of ``initial_models`` random models."""
    config = engine.config
    key = (jax.random.PRNGKey(seed_or_key) if isinstance(seed_or_key, int)
           else jnp.asarray(seed_or_key))
    key, k_images, k_queue = jax.random.split(key, 3)
    images = init_synthetic(k_images, config, real)
    queue = queue_lib.init_queue(k_queue, engine.init_params, engine.optimizer,
                                 config.net_num, config.initial_models)
    return CondenseState(images=images, momentum=jnp.zeros_like(images), queue=queue,
                         key=key, iteration=jnp.asarray(0, jnp.int32))


# --------------------------------------------------------------------------- image optimiser
def _geometric(mu: float, n: jax.Array) -> jax.Array:
    """sum_{j=0}^{n-1} mu**j for integer arrays n (mu in [0, 1])."""
    n = n.astype(jnp.float32)
    return n if mu == 1.0 else (1.0 - mu ** n) / (1.0 - mu)


def per_class_image_update(images, momentum, grad_at, lr: float, mu: float):
    """C sequential class steps of PyTorch SGD-momentum in closed form.

    Class ``c`` (rows ``c*ipc..``) first moves ``c`` times by momentum alone, then takes its own
    step with gradient ``g_c``, then moves ``C-1-c`` more times by momentum. With ``b`` the buffer
    at the start: its rows stand at ``x - lr*b*mu*(1-mu^c)/(1-mu)`` when its gradient is taken.

    Args:
      images, momentum: (K, ipc, H, W, C).
      grad_at: function mapping the (K, ipc, H, W, C) images *at each class's own step* to the
        gradient of every class's loss w.r.t. its own rows (same shape) and aux outputs.
      lr, mu: learning rate and momentum of the image optimiser.

    Returns (new images, new momentum, aux).
    """
    num_classes = images.shape[0]
    c = jnp.arange(num_classes)
    expand = lambda v: v.reshape((num_classes,) + (1,) * (images.ndim - 1))
    before = expand(mu * _geometric(mu, c))                  # momentum-only moves before step c
    at_step = images - lr * before * momentum
    grads, aux = grad_at(at_step)
    buf = expand(mu ** (c + 1.0)) * momentum + grads          # buffer right after step c
    after = expand(_geometric(mu, num_classes - c))           # step c and the C-1-c that follow
    new_images = at_step - lr * after * buf
    new_momentum = expand(mu ** (num_classes - 1.0 - c)) * buf
    return new_images, new_momentum, aux


def sequential_image_update(images, momentum, class_grad, lr: float, mu: float):
    """Reference: the official loop, one SGD step per class over the whole tensor (lax.scan).

    ``class_grad(c, images)`` returns the gradient of class ``c``'s loss w.r.t. its rows
    (ipc, H, W, C). Shapes as ``per_class_image_update``.
    """
    def step(carry, c):
        x, buf = carry
        g = jnp.zeros_like(x).at[c].set(class_grad(c, x[c]))
        buf = mu * buf + g
        return (x - lr * buf, buf), None

    (x, buf), _ = jax.lax.scan(step, (images, momentum), jnp.arange(images.shape[0]))
    return x, buf


# --------------------------------------------------------------------------- one iteration
def class_losses(engine: Engine, params, syn, real_features, real_mask, dsa_keys, ce_scale,
                 mesh: Optional[Mesh] = None):
    """Per-class IDM loss for every class at once.

    Args:
      syn: (K, ipc, H, W, C) synthetic images of each class.
      real_features: (K, B, D) embeddings of the augmented real batches (constants).
      real_mask: (K, B) valid real rows.
      dsa_keys: (K, 2) one Siamese DSA key per class, the same used for the real batch.
      ce_scale: scalar CE weight (ce_weight * accuracy%).
      mesh: optional device mesh; the class axis of the views and features is then split over it.

    Returns (K,) total loss, and (mmd (K,), ce (K,)).
    """
    config = engine.config
    num_classes, ipc = syn.shape[:2]

    def expand_and_augment(images, key):
        if config.partition_expand:
            images = partition.partition_expand(images, config.partition_factor)
        return augment.dsa(key, images, config.dsa_strategy, siamese=True)

    shard = lambda x: sharding_lib.constrain(x, mesh)
    views = shard(jax.vmap(expand_and_augment)(syn, dsa_keys))   # (K, P*ipc, H, W, C)
    per_class = views.shape[1]
    # Chunked on a single device (a cache-sized batch per call, see idm_jax.microbatch); on a
    # mesh the sharded batch is already split.
    chunk = engine.chunk if mesh is None else 0
    embedding, logits = microbatch.apply_in_chunks(
        lambda x: engine.apply(params, x), views.reshape((-1,) + views.shape[2:]), chunk)
    embedding = shard(embedding.reshape(num_classes, per_class, -1))
    logits = shard(logits.reshape(num_classes, per_class, -1))
    mmd = losses.class_mmd(real_features, embedding, real_mask)
    # Padding classes of a sharded run (past the model's classes) borrow the last label; their
    # losses are thrown away by the caller.
    labels = jnp.minimum(jnp.arange(num_classes), logits.shape[-1] - 1)
    labels = jnp.broadcast_to(labels[:, None], (num_classes, per_class))
    ce = jax.vmap(losses.class_aware_ce, in_axes=(0, 0, None))(logits, labels, 1.0)
    return mmd + ce_scale * ce, (mmd, ce)


def make_step(engine: Engine, real: RealData, jit: bool = True,
              mesh: Optional[Mesh] = None) -> Callable:
    """The outer iteration ``step(state, real) -> (state, metrics)``.

    With ``jit`` (default) it is compiled once and donates ``state``; ``jit=False`` returns the
    plain function (to wrap it, e.g. with ``chex.assert_max_traces``).

    With ``mesh`` (``sharding.make_mesh``) the same function runs over the mesh's devices: every
    per-class array is split on its class axis, queue training is data-parallel over its batch,
    and the jitted step expects ``real`` placed by ``sharding.shard_real`` and ``state`` by
    ``sharding.shard_state`` (it returns the state in that layout). ``mesh=None`` is the plain
    single-device program.
    """
    config = engine.config
    num_classes, nmax = real.num_classes, real.per_class.shape[1]
    ipc = config.ipc
    batch = min(config.batch_real, nmax)
    if mesh is not None and real.per_class.shape[0] % sharding_lib.mesh_size(mesh):
        raise ValueError(f"the real data has {real.per_class.shape[0]} classes, which the "
                         f"{sharding_lib.mesh_size(mesh)}-device mesh does not divide; place it "
                         f"with idm_jax.sharding.shard_real(real, mesh) (it pads the class axis)")
    shard = lambda x: sharding_lib.constrain(x, mesh)   # identity without a mesh
    # Chunked network calls on a single device (idm_jax.microbatch); a mesh splits the batch.
    chunk = engine.chunk if mesh is None else 0
    # On a mesh whose size does not divide K, the real data carries padding classes up to the
    # next multiple (sharding.shard_real); per-class arrays are padded the same way inside the
    # step so that every device holds whole classes, and the padding is dropped before use.
    padded = real.per_class.shape[0]

    def pad(x):
        if padded == num_classes:
            return x
        return jnp.pad(x, [(0, padded - num_classes)] + [(0, 0)] * (x.ndim - 1))

    def unpad(x):
        return x if padded == num_classes else x[:num_classes]

    def logits_fn(params, images):
        return engine.apply(params, images)[1]

    if mesh is not None and config.trained_bs % sharding_lib.mesh_size(mesh) == 0:
        # Explicit data parallelism for the queue trainees: each device runs its slice of the
        # batch, and the transpose of the replicated weights sums their gradients. (Left to
        # itself, the compiler all-gathers the batch of the vmapped trainees.)
        logits_fn = sharding_lib.data_parallel(logits_fn, mesh)

    def match(r: RealData, state_images, state_momentum, queue, key):
        """One sweep over all classes with one extractor drawn from the queue."""
        k_slot, k_real, k_dsa = jax.random.split(key, 3)
        slot = queue_lib.sample_slots(queue, k_slot, 1)[0][0]
        params = jax.tree.map(lambda leaf: leaf[slot], queue.params)
        accuracy = queue_lib.accuracy_percent(queue, slot)
        ce_scale = config.ce_weight * accuracy if config.syn_ce else jnp.float32(0.0)

        idx, mask = class_batch_indices(k_real, r.counts, nmax, batch, config.real_sampling)
        idx, mask = shard(pad(idx)), shard(pad(mask))                   # (Kp, B)
        # Each device gathers its own classes' rows: per_class is split on the class axis.
        pixels = jnp.take_along_axis(r.per_class, idx.reshape(idx.shape + (1, 1, 1)), axis=1)
        real_images = shard(_to_float(r, pixels, config.normalize_train))   # (Kp, B, H, W, C)
        dsa_keys = pad(jax.random.split(k_dsa, num_classes))
        real_views = shard(jax.vmap(
            lambda k, x: augment.dsa(k, x, config.dsa_strategy, siamese=True))(dsa_keys,
                                                                              real_images))
        real_features, _ = microbatch.apply_in_chunks(
            lambda x: engine.apply(params, x), real_views.reshape((-1,) + r.image_shape), chunk)
        real_features = shard(jax.lax.stop_gradient(real_features.reshape(padded, batch, -1)))

        def total_loss(syn):
            per_class, (mmd, ce) = class_losses(engine, params, syn, real_features, mask,
                                                dsa_keys, ce_scale, mesh=mesh)
            per_class, mmd, ce = unpad(per_class), unpad(mmd), unpad(ce)
            return jnp.sum(per_class), (per_class, (mmd, ce))

        def grad_at(syn):
            grads, (per_class, (mmd, ce)) = jax.grad(total_loss, has_aux=True)(shard(pad(syn)))
            return unpad(grads), (per_class, mmd, ce)

        shape = (num_classes, ipc) + r.image_shape
        x, buf = shard(state_images.reshape(shape)), shard(state_momentum.reshape(shape))
        if config.image_update == "per_class":
            x, buf, aux = per_class_image_update(x, buf, grad_at, config.lr_img,
                                                 config.img_momentum)
        else:  # DM's single step on the loss summed over classes
            grads, aux = grad_at(x)
            buf = config.img_momentum * buf + grads
            x = x - config.lr_img * buf
        per_class, mmd, ce = aux
        metrics = {"loss": jnp.mean(per_class), "mmd": jnp.mean(mmd), "ce": jnp.mean(ce),
                   "ce_scale": ce_scale, "extractor_acc": accuracy}
        return x.reshape(state_images.shape), buf.reshape(state_images.shape), metrics

    def step(state: CondenseState, r: RealData):
        # ``r`` is an argument, not a closure constant: the dataset is not baked into the program.
        it = state.iteration
        key, k_push, k_match, k_trainees, k_train = jax.random.split(state.key, 5)
        queue = state.queue
        queue = jax.lax.cond((it > 0) & (it % config.eval_interval == 0),
                             queue_lib.reset_meters, lambda q: q, queue)

        def push_models(q):
            for push_key in jax.random.split(k_push, config.net_push_num):
                q = queue_lib.push(q, push_key, engine.init_params, engine.optimizer)
            return q

        if config.net_push_num > 0:
            queue = jax.lax.cond(it % config.net_generate_interval == 0, push_models,
                                 lambda q: q, queue)

        images, momentum = state.images, state.momentum
        metrics = {}
        for match_key in jax.random.split(k_match, config.train_net_num):
            images, momentum, metrics = match(r, images, momentum, queue, match_key)

        def trainee_batch(k):
            # On a mesh each device keeps its slice of the batch (data parallel, see logits_fn).
            images, labels = sample_all_classes(r, k, config.trained_bs, config.normalize_train)
            return shard(images), shard(labels)

        slots, active = queue_lib.sample_slots(queue, k_trainees, config.fetch_net_num)
        queue, trainee_acc = queue_lib.train_slots(
            queue, k_train, slots, active, logits_fn, trainee_batch, engine.optimizer,
            config.model_train_steps, chunk=chunk)
        # The loss is taken before the update, so a blow-up shows in the images one iteration
        # before it shows in the loss (or never, on the last iteration): report both.
        metrics = dict(metrics, trainee_acc=jnp.mean(trainee_acc) if trainee_acc.size else 0.0,
                       queue_size=queue_lib.size(queue),
                       images_finite=jnp.all(jnp.isfinite(images)).astype(jnp.float32))
        new_state = CondenseState(images=images, momentum=momentum, queue=queue, key=key,
                                  iteration=it + 1)
        return new_state, metrics

    if not jit:
        return step
    if mesh is None:
        return jax.jit(step, donate_argnums=0)
    state_sharding = sharding_lib.state_shardings(mesh, num_classes * ipc)
    return jax.jit(step, donate_argnums=0,
                   in_shardings=(state_sharding, sharding_lib.real_shardings(mesh)),
                   out_shardings=(state_sharding, sharding_lib.replicated(mesh)))


# --------------------------------------------------------------------------- run loop
class CondensedSet(NamedTuple):
    """A condensed set in normalised space, as stored (before partition-and-expand)."""

    images: np.ndarray      # (K*ipc, H, W, C) float32
    labels: np.ndarray      # (K*ipc,) int32
    mean: np.ndarray        # (C,) normalisation mean, [0,1] units
    std: np.ndarray         # (C,)


def condensed_set(state: CondenseState, real: RealData, ipc: int) -> CondensedSet:
    return CondensedSet(np.asarray(state.images), np.asarray(synthetic_labels(real.num_classes,
                                                                                  ipc)),
                        np.asarray(real.mean), np.asarray(real.std))


def iterate(engine: Engine, real: RealData, state: CondenseState,
            until: Optional[int] = None, step: Optional[Callable] = None,
            mesh: Optional[Mesh] = None) -> Iterator[tuple[CondenseState, dict]]:
    """Run iterations from ``state.iteration`` up to ``until`` (default config.iterations).

    Yields (state, metrics) after every iteration; metrics are host floats plus ``iteration`` and
    ``seconds`` (wall time of that iteration). The yielded state is the only live copy (the step
    donates its input), so keep it if you stop early. Pass ``step`` (from ``make_step``) to reuse
    one compiled program across calls. With ``mesh`` the step runs sharded over its devices
    (``make_step``); ``real`` and ``state`` are placed on the mesh first if they are not yet.
    """
    if mesh is not None:
        real, state = sharding_lib.shard_real(real, mesh), sharding_lib.shard_state(state, mesh)
    step = make_step(engine, real, mesh=mesh) if step is None else step
    until = engine.config.iterations if until is None else until
    while int(state.iteration) < until:
        start = time.perf_counter()
        state, metrics = step(state, real)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        metrics["iteration"] = int(state.iteration) - 1
        metrics["seconds"] = time.perf_counter() - start
        yield state, metrics


def condense(config: Config, train_images: np.ndarray, train_labels: np.ndarray, *, mean, std,
             num_classes: Optional[int] = None, state: Optional[CondenseState] = None,
             callback: Optional[Callable[[CondenseState, dict], None]] = None,
             mesh: Optional[Mesh] = None) -> tuple[CondensedSet, CondenseState]:
    """Condense a labelled uint8 image set with IDM; the library entry point (no CLI needed).

    Args:
      config: run configuration (see ``idm_jax.config``).
      train_images: (N, H, W, C) uint8 real images; train_labels: (N,) ints.
      mean, std: per-channel normalisation constants in [0,1] pixel units.
      state: continue from this state (e.g. restored from a checkpoint) instead of a fresh one.
      callback: called as ``callback(state, metrics)`` after every iteration (logging,
        checkpointing); raise from it to stop.
      mesh: run over the devices of this mesh (``sharding.make_mesh()``); None: one device.

    Returns (the condensed set, the final state).
    """
    real = prepare_real(train_images, train_labels, mean, std, num_classes, mesh=mesh)
    engine = make_engine(config, real.num_classes, real.image_shape)
    if state is None:
        state = init_state(engine, real, config.seed)
    for state, metrics in iterate(engine, real, state, mesh=mesh):
        if not np.isfinite(metrics["loss"]):
            raise FloatingPointError(f"loss is {metrics['loss']} at iteration "
                                     f"{metrics['iteration']}")
        if callback is not None:
            callback(state, metrics)
    return condensed_set(state, real, config.ipc), state


make_module_callable(__name__, condense)

__all__ = ["RealData", "prepare_real", "CondenseState", "Engine", "make_engine", "init_state",
           "init_synthetic", "make_step", "per_class_image_update", "sequential_image_update",
           "class_losses", "iterate", "condense", "CondensedSet", "synthetic_labels",
           "class_batch_indices", "sample_all_classes"]
