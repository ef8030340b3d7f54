"""Multi-process (multi-host) start-up: ``jax.distributed`` from flags, environment or cluster.

``train.py`` calls :func:`initialize` before anything touches a JAX backend. Three forms:

* flags: ``--coordinator HOST:PORT --num-processes N --process-id I`` (any one of them
  switches multi-process on; the missing ones come from the environment or the cluster);
* environment: ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``
  (``JAX_COORDINATOR_ADDRESS`` alone is enough on a detected cluster);
* ``--distributed auto``: ``jax.distributed.initialize()`` with no arguments, i.e. JAX's own
  cluster detection (Cloud TPU VMs / pod slices, SLURM ``srun``, Open MPI, Kubernetes).

On the CPU platform the cross-process collectives are gloo's
(``jax_cpu_collectives_implementation='gloo'``), so a loopback job of several processes is a
real multi-host run (what tests/test_multihost.py does). A process that loses a peer (killed,
node down) is stopped by the coordination service's heartbeat after
``--heartbeat-timeout`` seconds; :class:`PeerWatchdog` additionally prints one clear line
naming the missing process before the process exits with :data:`PEER_LOST_EXIT`.
"""
from __future__ import annotations

import logging
import os
import sys
import threading

log = logging.getLogger("jaxspec.distributed")

#: exit code of a process whose peer disappeared (see :class:`PeerWatchdog`)
PEER_LOST_EXIT = 12

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"

_initialized = False
_watchdog = None


def add_arguments(parser) -> None:
    """The multi-process flags of ``train.py``."""
    g = parser.add_argument_group("multi-process (jax.distributed)")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help=f"address of process 0's coordination service (or ${ENV_COORDINATOR})")
    g.add_argument("--num-processes", type=int, default=None,
                   help=f"number of processes of the job (or ${ENV_NUM_PROCESSES})")
    g.add_argument("--process-id", type=int, default=None,
                   help=f"this process's index, 0 .. N-1 (or ${ENV_PROCESS_ID})")
    g.add_argument("--distributed", choices=("off", "auto", "on"), default=None,
                   help="auto: jax.distributed.initialize() with cluster auto-detection (TPU "
                        "VM, SLURM, MPI, k8s); default: on when a flag or JAX_* variable above "
                        "is given, else off")
    g.add_argument("--heartbeat-timeout", type=int, default=30, metavar="SECONDS",
                   help="a process whose peer stops answering for this long stops")


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    try:
        return int(v)
    except ValueError:
        from jaxspec.errors import UsageError
        raise UsageError(f"${name}={v!r} is not an integer") from None


def settings(coordinator=None, num_processes=None, process_id=None, mode=None) -> dict | None:
    """The ``jax.distributed.initialize`` keyword arguments the flags / environment ask for,
    or None for a single-process run. ``mode`` 'auto' leaves unset values to JAX's cluster
    detection."""
    from jaxspec.errors import UsageError
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    given = (coordinator, num_processes, process_id)
    if mode == "off":
        return None
    if mode is None and all(v is None for v in given):
        return None
    if num_processes is not None and num_processes < 1:
        raise UsageError(f"--num-processes must be >= 1, got {num_processes}")
    if process_id is not None and num_processes is not None \
            and not 0 <= process_id < num_processes:
        raise UsageError(f"--process-id must be in 0..{num_processes - 1}, got {process_id}")
    if coordinator is not None and ":" not in coordinator:
        raise UsageError(f"--coordinator must be HOST:PORT, got {coordinator!r}")
    if mode != "auto" and None in given:
        # explicit form: whatever is missing must come from a detected cluster
        from jax._src import clusters
        if not any(c.is_env_present() for c in clusters.ClusterEnv._cluster_types):
            missing = [f for f, v in zip(("--coordinator", "--num-processes", "--process-id"),
                                         given) if v is None]
            raise UsageError(f"multi-process run: {', '.join(missing)} missing (no cluster "
                             f"environment detected to fill them in)")
    return {"coordinator_address": coordinator, "num_processes": num_processes,
            "process_id": process_id}


def initialize(coordinator=None, num_processes=None, process_id=None, mode=None, *,
               heartbeat_timeout: int = 30, watchdog: bool = True) -> bool:
    """Start ``jax.distributed`` if asked (see :func:`settings`); returns whether this is a
    multi-process run. Must run before any JAX computation; idempotent."""
    global _initialized, _watchdog
    kw = settings(coordinator, num_processes, process_id, mode)
    if kw is None:
        return False
    if _initialized:
        return True
    import jax
    try:   # CPU cross-process collectives (a no-op on TPU/GPU, which have their own)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, ValueError):   # pragma: no cover - option renamed/removed
        pass
    jax.distributed.initialize(**kw, heartbeat_timeout_seconds=int(heartbeat_timeout),
                               initialization_timeout=max(60, int(heartbeat_timeout) * 4),
                               shutdown_timeout_seconds=max(10, int(heartbeat_timeout)))
    _initialized = True
    _service_barriers_for_orbax()
    log.info("jax.distributed: process %d of %d, %d local / %d global devices",
             jax.process_index(), jax.process_count(), jax.local_device_count(),
             jax.device_count())
    if watchdog and jax.process_count() > 1:
        _watchdog = PeerWatchdog(timeout=heartbeat_timeout)
        _watchdog.start()
    return True


def is_multiprocess() -> bool:
    import jax
    return jax.process_count() > 1


_ORBAX_BARRIER_FLAG = "experimental_orbax_use_distributed_barrier"


def _service_barriers_for_orbax() -> None:
    """Make orbax wait at the coordination service's barriers instead of its default
    ``sync_global_devices``, a device all-reduce compiled and run for every barrier (about
    seven per checkpoint save). Device barriers interleave extra CPU (gloo) collectives with
    the train step's own; under load one process running ahead then made gloo abort its
    peer ("Received data size doesn't match expected size"). Service barriers also time out
    instead of hanging. The switch is orbax's absl flag; programs that never parse absl
    flags get it set directly."""
    try:
        from absl import flags
        import orbax.checkpoint  # noqa: F401 - defines the flag
    except ImportError:   # pragma: no cover - orbax is a dependency
        return
    if _ORBAX_BARRIER_FLAG not in flags.FLAGS:   # pragma: no cover - flag renamed/removed
        log.debug("orbax has no --%s flag; its barriers stay device barriers",
                  _ORBAX_BARRIER_FLAG)
        return
    entry = flags.FLAGS[_ORBAX_BARRIER_FLAG]
    entry.value = True
    entry.present = 1     # readable although absl's flags were never parsed


_BARRIER_TIMEOUT_S = 3600
_barrier_counts: dict[str, int] = {}


def sync(name: str, timeout_s: int = _BARRIER_TIMEOUT_S) -> None:
    """Barrier over all processes (no-op in a single-process run), held by the coordination
    service (no device collective; a barrier name may be reused: each use gets its own id)."""
    import jax
    if jax.process_count() == 1:
        return
    from jax._src import distributed as jd
    client = jd.global_state.client
    n = _barrier_counts.get(name, 0)
    _barrier_counts[name] = n + 1
    if client is None:   # pragma: no cover - multi-process without jax.distributed
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
        return
    client.wait_at_barrier(f"jaxspec/{name}/{n}", int(timeout_s * 1000))


class StopAgreement:
    """Stops every process of a job at the same step when a signal reached some of them.

    The processes run in lock-step (each step has collectives) but a SIGTERM lands on each at
    a different step; a device collective per step would serialise the host with the device.
    Instead a signalled process publishes ``stop_at = its step + margin`` in the coordination
    service's key-value store and every process stops when it reaches the smallest published
    value (one cheap RPC per step, no device synchronisation)."""

    KEY = "jaxspec/stop_at"

    def __init__(self, margin: int = 3):
        import jax
        self.margin = int(margin)
        self.multi = jax.process_count() > 1
        self.stop_at: int | None = None
        self._published = False

    def _client(self):
        from jax._src import distributed as jd
        return jd.global_state.client

    def should_stop(self, flag: bool, step: int) -> bool:
        """Call once per step after step ``step``; ``flag``: this process was signalled."""
        if not self.multi:
            return bool(flag)
        client = self._client()
        if flag and not self._published:
            self._published = True
            mine = int(step) + self.margin
            try:
                client.key_value_set(f"{self.KEY}/{_process_index()}", str(mine))
            except Exception:   # pragma: no cover - service gone
                pass
        try:
            entries = client.key_value_dir_get(self.KEY)
        except Exception:   # pragma: no cover
            entries = []
        for _, v in entries:
            v = int(v)
            self.stop_at = v if self.stop_at is None else min(self.stop_at, v)
        return self.stop_at is not None and step >= self.stop_at


def _process_index() -> int:
    import jax
    return jax.process_index()


def broadcast_str(value: str | None, max_len: int = 256) -> str | None:
    """Process 0's ``value`` on every process (None stays None)."""
    import jax
    if jax.process_count() == 1:
        return value
    import numpy as np
    from jax.experimental import multihost_utils
    buf = np.zeros(max_len + 1, np.int32)
    if value is not None:
        raw = value.encode("utf-8")[:max_len]
        buf[0] = len(raw) + 1
        buf[1:len(raw) + 1] = np.frombuffer(raw, np.uint8)
    out = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    n = int(out[0])
    if n == 0:
        return None
    return bytes(out[1:n].astype(np.uint8)).decode("utf-8")


class PeerWatchdog(threading.Thread):
    """Polls the coordination service's live-task list; when a peer process is gone, prints
    one line naming it and ends this process with :data:`PEER_LOST_EXIT` (a collective
    waiting on the dead peer would otherwise block until JAX's own shutdown)."""

    def __init__(self, timeout: float = 30, interval: float = 1.0):
        super().__init__(name="jaxspec-peer-watchdog", daemon=True)
        self.timeout, self.interval = float(timeout), float(interval)
        self._stop_event = threading.Event()

    def _alive(self) -> list[int] | None:
        from jax._src import distributed as jd
        client = jd.global_state.client
        if client is None:
            return None
        import jax
        try:
            live = client.get_live_nodes(list(range(jax.process_count())))
        except Exception:   # the service itself is gone (process 0 died)
            return []
        return sorted(int(k) for k in (live.keys() if hasattr(live, "keys") else live))

    def run(self) -> None:   # pragma: no cover - exercised by tests/test_multihost.py in a child
        import jax
        n = jax.process_count()
        me = jax.process_index()
        while not self._stop_event.wait(self.interval):
            alive = self._alive()
            if alive is None or self._stop_event.is_set():
                return
            missing = [p for p in range(n) if p not in alive and p != me]
            if missing:
                what = ("the coordinator (process 0)" if 0 in missing
                        else "process " + ", ".join(map(str, missing)))
                sys.stderr.write(
                    f"jaxspec: {what} of this {n}-process job stopped responding; process "
                    f"{me} stops too. Restart all processes with the same command to resume "
                    f"from the last checkpoint.\n")
                sys.stderr.flush()
                os._exit(PEER_LOST_EXIT)

    def stop(self) -> None:
        self._stop_event.set()


def stop_watchdog() -> None:
    """Stop the :class:`PeerWatchdog` (before the end-of-run barrier: peers then leave)."""
    global _watchdog
    if _watchdog is not None:
        _watchdog.stop()
        _watchdog.join(timeout=5)
        _watchdog = None


def shutdown() -> None:
    """Stop the watchdog and ``jax.distributed`` (end of a multi-process run)."""
    global _initialized
    stop_watchdog()
    if _initialized:
        import jax
        jax.distributed.shutdown()
        _initialized = False

