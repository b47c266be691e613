"""Generic mesh code: a 1-D device mesh, placing pytrees on it, and several hosts.

This module knows nothing of the engine. State types say how they are laid out
(``RealData.layout(mesh)``, ``CondenseState.layout(mesh, rows)``) and ``place`` puts any pytree
on the mesh by such a sharding prefix; ``ClassLayout`` hides the class-axis padding and sharding
constraints from the maths of a step.

How a condensation run is spread (``idm_jax.engine.make_step(engine, real, mesh=mesh)``): IDM's
work splits along the class axis, since each class matches its own real batch against its own
synthetic images. So the real images (K, Nmax, H, W, C) are split on K (each device stores,
augments and embeds only its own classes), the synthetic images and their momentum are split on
their class rows, and inside the step every per-class array is split on K, so matching runs
without cross-device traffic. The model queue, the PRNG key and the counters are replicated (a
ConvNet is a few MB), while the two queue trainees train data-parallel (``data_parallel``): their
batch is split over the mesh axis and the devices' weight gradients are summed. ``mesh=None`` is
the plain single-device program; results agree with it to float rounding (the order of a few
sums changes), not bit for bit.

A class axis that the device count does not divide (CIFAR-10 on 4 devices) is padded with empty
classes up to the next multiple (``padded_size``; ``real.shard_real`` pads the stored data,
``ClassLayout`` the arrays built inside the step). Synthetic rows whose count the device count
does not divide are stored replicated (they are small). Checkpoints hold global arrays, so a run
saved on 4 devices resumes on 2 or 1 (``engine.shard_state``).

Several hosts
-------------
Every host runs the same program (JAX's multi-controller model). On each host, before any other
JAX call::

    from idm_jax import real
    from idm_jax.accel import sharding
    sharding.initialize_distributed("10.0.0.1:1234", num_processes=2, process_id=RANK)
    mesh = sharding.make_mesh()          # all devices of all hosts, grouped host by host

(``coordinator_address`` is host 0's address and a free port, the same on every host; on Cloud
TPU, SLURM or Open MPI all three arguments may be left out and are detected.) The CLI makes this
call when given ``--distributed``; start the same command on every host. Each host then loads
only the classes its devices hold::

    own = sharding.host_class_slice(len(counts), mesh)      # e.g. slice(0, 50) on host 0 of 2
    images, labels = load_classes(own)   # uint8 (n, H, W, C) and labels in own.start..stop-1
    data = real.real_from_host_shard(images, labels, counts, mean, std, mesh)

The synthetic state is created identically on every host (same seed) and placed with
``engine.shard_state``; orbax writes each host's shards in parallel (use a shared file system for
the work directory). Only host 0 should print and export results; ``to_host`` gathers a split
array onto every host (a collective: all hosts call it). ``tests/test_multihost.py`` runs the
CLI as two processes with two CPU devices each over localhost and checks it against one device;
separate machines and accelerators are not tested.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


# --------------------------------------------------------------------------- the mesh
def make_mesh(num_devices: Optional[int] = None, devices: Optional[Sequence] = None,
              axis_name: str = DATA_AXIS) -> Mesh:
    """A 1-D mesh over ``devices`` (default: the first ``num_devices`` of ``jax.devices()``, all
    by default), ordered host by host so that each host holds one contiguous block of classes.

    The axis type is ``Auto``: the compiler (GSPMD) propagates shardings from the ones we set.
    Traffic along the axis is light (the trainees' gradient all-reduce and their gathered real
    batches), so the device order need not follow the interconnect topology.
    """
    if devices is None:
        devices = jax.devices()
        if num_devices is not None:
            if not 1 <= num_devices <= len(devices):
                raise ValueError(f"num_devices must be in 1..{len(devices)} (the devices JAX "
                                 f"sees), got {num_devices}; on CPU, simulate more with XLA_FLAGS="
                                 f"--xla_force_host_platform_device_count=N")
            devices = devices[:num_devices]
    else:
        devices = list(devices)
        if not devices:
            raise ValueError("devices is empty; pass at least one device or leave it out")
        if num_devices is not None and num_devices != len(devices):
            raise ValueError(f"num_devices={num_devices} but {len(devices)} devices were given; "
                             f"pass only one of the two")
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices), (axis_name,), axis_types=(AxisType.Auto,))


def mesh_size(mesh: Mesh) -> int:
    return int(mesh.devices.size)


def _axis(mesh: Mesh) -> str:
    if len(mesh.axis_names) != 1:
        raise ValueError(f"the engine shards over a 1-D mesh, got axes {mesh.axis_names}; "
                         f"build one with idm_jax.accel.sharding.make_mesh")
    return mesh.axis_names[0]


def padded_size(size: int, mesh: Mesh) -> int:
    """``size`` rounded up to a multiple of the mesh size (e.g. the real data's class axis)."""
    n = mesh_size(mesh)
    return -(-size // n) * n


def split(mesh: Mesh) -> NamedSharding:
    """Leading axis split over the mesh, the rest whole."""
    return NamedSharding(mesh, PartitionSpec(_axis(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def rows(mesh: Mesh, num_rows: int) -> NamedSharding:
    """Split the leading axis when the mesh divides it, else replicate (committed arrays cannot
    be split unevenly; inside a jitted step the compiler can)."""
    return split(mesh) if num_rows % mesh_size(mesh) == 0 else replicated(mesh)


def constrain(x: jax.Array, mesh: Optional[Mesh]) -> jax.Array:
    """Inside jit: ask for ``x``'s leading axis (classes, or a batch) split over the mesh.

    A no-op without a mesh, so the single-device program is untouched. The leading axis need not
    be a multiple of the mesh size (the compiler pads internally).
    """
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, split(mesh))


def data_parallel(fn, mesh: Optional[Mesh]):
    """``fn(params, batch) -> out`` run data-parallel: ``batch`` (B, ...) and ``out`` (B, ...)
    split over the mesh, ``params`` replicated. Under ``jax.grad`` the weight gradients of the
    devices are summed (shard_map's transpose of a replicated input), so the result equals the
    single-device ``fn``. B must be a multiple of the mesh size. Identity without a mesh.
    """
    if mesh is None:
        return fn
    spec = PartitionSpec(_axis(mesh))
    # check_vma=False: the models' custom VJPs (e.g. the CPU convolution's linear_transpose) do
    # not carry shard_map's varying-axis types. The transpose still sums the cotangent of the
    # replicated params over the devices (tests/test_sharding.py compares with one device).
    return jax.shard_map(fn, mesh=mesh, in_specs=(PartitionSpec(), spec), out_specs=spec,
                         check_vma=False)


# --------------------------------------------------------------------------- placement
def expand_prefix(prefix, tree):
    """A full tree of shardings from a prefix tree (one sharding per leaf of ``tree``)."""
    return jax.tree.map(lambda s, sub: jax.tree.map(lambda _: s, sub), prefix, tree)


def _put(value, sharding: NamedSharding) -> jax.Array:
    """Place a host or device array; host arrays go to each device slice by slice (no full copy
    on one device), which also works when the mesh spans several hosts."""
    if isinstance(value, jax.Array):
        return jax.device_put(value, sharding)
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def place(tree, layout):
    """Every array of ``tree`` placed by the sharding prefix ``layout`` (host or device arrays).

    State types say how they are laid out (``RealData.layout(mesh)``,
    ``CondenseState.layout(mesh, rows)``); this module knows nothing of them.
    """
    return jax.tree.map(_put, tree, expand_prefix(layout, tree))


@dataclasses.dataclass(frozen=True)
class ClassLayout:
    """Where the class axis of per-class arrays lives inside a jitted step.

    Without a mesh every method is the identity, so the single-device program is untouched. On a
    mesh the class axis is padded from ``num_classes`` to ``padded`` (a multiple of the device
    count, the class axis of the sharded real data) so that every device holds whole classes, and
    split over the devices. The maths stays unaware of either: it pads what it builds per class,
    constrains it, and unpads before anything that must see exactly K classes.
    """

    num_classes: int
    mesh: Optional[Mesh] = None

    @property
    def padded(self) -> int:
        return self.num_classes if self.mesh is None else padded_size(self.num_classes, self.mesh)

    def pad(self, x: jax.Array) -> jax.Array:
        """(K, ...) -> (padded, ...) with zero rows appended."""
        extra = self.padded - self.num_classes
        return x if not extra else jnp.pad(x, [(0, extra)] + [(0, 0)] * (x.ndim - 1))

    def unpad(self, x: jax.Array) -> jax.Array:
        """(padded, ...) -> (K, ...)."""
        return x if self.padded == self.num_classes else x[:self.num_classes]

    def constrain(self, x: jax.Array) -> jax.Array:
        """Ask for the leading axis (classes, or a batch) split over the mesh."""
        return constrain(x, self.mesh)

    def per_device(self, fn):
        """``fn(params, batch)`` run on each device's block of ``batch`` (``data_parallel``), so
        a chunked network call chunks its own device's images instead of the global batch.
        The batch is whole classes (padded): its leading axis is a multiple of the mesh size."""
        return data_parallel(fn, self.mesh)


# --------------------------------------------------------------------------- several hosts
def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None, *, enabled: bool = True,
                           local_device_ids: Optional[Sequence[int]] = None) -> bool:
    """Join a multi-host run (``jax.distributed.initialize``); must precede every other JAX call.

    Args:
      coordinator_address: "host:port" of process 0, the same on every host.
      num_processes: number of hosts (processes); process_id: this one's rank, 0..num_processes-1.
        All three may be None on Cloud TPU, SLURM and Open MPI, which provide them.
      enabled: False makes this a no-op (the CLI passes its ``--distributed`` flag here).
      local_device_ids: restrict this process to these local devices (e.g. one GPU per process).

    Returns True if the distributed system is (now) initialised, False when not enabled.
    """
    if not enabled:
        return False
    if jax.distributed.is_initialized():
        return True
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in 0..{num_processes - 1}, got {process_id}")
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   local_device_ids=local_device_ids)
    except RuntimeError as err:
        raise RuntimeError(f"{err}. Call idm_jax.accel.sharding.initialize_distributed at the very "
                           f"start of the program, before anything touches JAX devices") from err
    return True


def host_class_slice(num_classes: int, mesh: Optional[Mesh] = None) -> slice:
    """The classes whose real data this process must load: ``slice(start, stop)`` in 0..K.

    They are the classes that ``real.shard_real`` puts on this process's devices (a contiguous
    block, as ``make_mesh`` orders devices host by host). With one process it is ``slice(0, K)``.
    """
    block = host_block(num_classes, mesh if mesh is not None else make_mesh())
    return slice(min(block.start, num_classes), min(block.stop, num_classes))


def host_block(num_classes: int, mesh: Mesh) -> slice:
    """This process's contiguous block of the padded class axis (padding classes included)."""
    shape = (padded_size(num_classes, mesh),)
    spans = sorted((idx[0].start or 0, shape[0] if idx[0].stop is None else idx[0].stop)
                   for idx in split(mesh).addressable_devices_indices_map(shape).values())
    for (_, stop), (start, _) in zip(spans, spans[1:]):
        if start != stop:
            raise ValueError("this process's devices are not contiguous in the mesh, so its "
                             "classes are not one block; build the mesh with make_mesh()")
    return slice(spans[0][0], spans[-1][1])


def to_host(tree):
    """Every array of ``tree`` as a whole NumPy array on this host.

    Arrays split over several hosts' devices are gathered from the other hosts
    (``multihost_utils.process_allgather``), which is a collective: with several hosts, every
    host must make the same ``to_host`` calls in the same order. Arrays this process can read in
    full (single host, or replicated) are copied without communication.
    """
    from jax.experimental import multihost_utils

    def fetch(x):
        if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(fetch, tree)


def sync_hosts(name: str) -> None:
    """Wait until every host reaches the barrier ``name`` (no-op with one host)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def any_host(flag: bool) -> bool:
    """True if ``flag`` is True on any host (every host must call it; no-op with one host).

    Lets all hosts take the same branch, e.g. all stop and checkpoint at the same iteration when
    only some of them received Ctrl-C.
    """
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.bool_))))


__all__ = ["DATA_AXIS", "make_mesh", "mesh_size", "padded_size", "split", "replicated", "rows",
           "constrain", "data_parallel", "expand_prefix", "place", "ClassLayout",
           "initialize_distributed", "host_class_slice", "host_block", "to_host", "any_host",
           "sync_hosts"]
