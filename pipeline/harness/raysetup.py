"""Connect to Ray once per command: an existing cluster (`--address` / RAY_ADDRESS) or a local one.

A local Ray gets more logical CPUs than cores (default 2x, at least 4): Ray Data's read tasks need
CPUs that Train workers would otherwise hold, and on 2 cores the read never starts.
"""

from __future__ import annotations

import os
import threading

from raykd.pipeline.core.errors import ConfigError
from raykd.pipeline.core.log import log

# Set before ray.init so every Ray process inherits them; a user's own value wins.
_ENV_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1",
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    "RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION": "0",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # else every worker print() reaches the console twice
    "RAY_DATA_LOGGING_CONFIG": os.path.join(os.path.dirname(__file__), "ray_data_logging.yaml"),
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",  # in workers; a stage driving Ray Data itself turns its bar on
}

# Worker and actor logs stay in the Ray session's log folder: the console shows raykd's progress lines
# (raykd.pipeline.core.progress). Without a dashboard (ray[train,tune] has none), Ray Train's placement-group
# cleaner warns every few seconds that the state API is unavailable, which would drown them.
# RAYKD_LOG_TO_DRIVER=1 brings the raw logs back.
LOG_TO_DRIVER = os.environ.get("RAYKD_LOG_TO_DRIVER", "0") == "1"
TRAIN_LOG_LEVEL = os.environ.get("RAYKD_TRAIN_LOG_LEVEL", "WARNING")


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is: the stage stops where it is, what it committed is kept."""


_catching_sigterm = False


def _raise_terminated(signum, frame):
    raise Terminated()


class sigterm_as_interrupt:
    """While the CLI runs, SIGTERM raises Terminated in the main thread (its `interrupted` line, exit 143).
    Ray's driver sets a handler of its own (sys.exit inside whatever runs, then an abort with its C++
    stack): init_ray puts this one back. The previous handler is restored on exit."""

    def __enter__(self):
        import signal
        import threading

        global _catching_sigterm
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, _raise_terminated)
            _catching_sigterm = True
        return self

    def __exit__(self, *exc) -> None:
        import signal

        global _catching_sigterm
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
            _catching_sigterm = False


def catch_sigterm() -> None:
    """Put raykd's SIGTERM handler back (after ray.init set Ray's), while the CLI has it on."""
    import signal

    if _catching_sigterm and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


_INIT = threading.Lock()  # `raykd run` builds its cache in a thread while its students start


def init_ray(cfg) -> None:
    """Start a local Ray or connect to `ray.address` / RAY_ADDRESS (once per process, from any thread). A
    cluster gets the environment settings and the user modules of `run.imports` (`plugins.ship`) with the job."""
    with _INIT:
        _init_ray(cfg)


def _init_ray(cfg) -> None:
    import ray

    if ray.is_initialized():
        route_raylet_messages()
        return
    ray_cfg = cfg.ray
    for k, v in _ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    address = ray_cfg.address or os.environ.get("RAY_ADDRESS")
    if not address and (address := started_here()):
        ignored = [k for k in ("num_cpus", "object_store_mb") if getattr(ray_cfg, k) is not None]
        log.info(f"[ray] joining the Ray cluster running on this machine (`ray start`, {address}), as ray.init() "
                 "does" + (f"; ray.{' and ray.'.join(ignored)} apply only to a Ray that raykd starts" if ignored else "")
                 + "; `ray stop` it for a Ray of raykd's own")
    if address:
        global _connected_address
        # a remote cluster's workers do not inherit this process's environment: ship the settings
        env = {k: os.environ[k] for k in _ENV_DEFAULTS if k != "RAY_DATA_LOGGING_CONFIG"}
        with _held_stderr() as held:  # Ray's core logs every failed attempt (~20 lines): kept, shown on success
            try:
                from raykd.pipeline.models.plugins import job_imports, ship

                runtime_env = {"env_vars": env}
                if py_modules := ship(job_imports(cfg)):
                    runtime_env["py_modules"] = py_modules
                ray.init(address=address, log_to_driver=LOG_TO_DRIVER, runtime_env=runtime_env)
            except (ConnectionError, RuntimeError, ValueError) as e:
                held.drop = True
                raise ConfigError(connection_message(address, e, held.text())) from None
        _connected_address = address
        catch_sigterm()
        route_raylet_messages()
        return
    num_cpus = ray_cfg.num_cpus or max(4, 2 * (os.cpu_count() or 1))
    store = ray_cfg.object_store_mb * 2**20 if ray_cfg.object_store_mb else None
    # address="local": a Ray of its own, never the stale address of a `ray start` cluster that is gone
    ray.init(address="local", num_cpus=num_cpus, object_store_memory=store, include_dashboard=False,
             log_to_driver=LOG_TO_DRIVER)
    catch_sigterm()
    route_raylet_messages()


def route_raylet_messages() -> None:
    """The raylet's error paragraphs (a worker that died, with its RayTask ID and exit detail), which Ray's
    driver prints whatever log_to_driver says, go to the raykd logger at debug level (`-v`): raykd says
    itself what failed and whether it is retried. RAYKD_LOG_TO_DRIVER=1 keeps Ray's own printing."""
    import ray._private.worker as worker  # private: Ray is pinned to 2.60

    if LOG_TO_DRIVER or getattr(worker.print_to_stdstream, "raykd", False):
        return
    ray_print = worker.print_to_stdstream

    def to_log(data, ignore_prefix):
        if data.get("pid") != "raylet":
            return ray_print(data, ignore_prefix)
        for line in data.get("lines", []):
            log.debug(f"[ray] {' '.join(str(line).split())}")

    to_log.raykd = True
    worker.print_to_stdstream = to_log


def started_here() -> str | None:
    """The address of a live cluster started on this machine with `ray start` (which a plain ray.init()
    joins), or None."""
    from ray._private import services  # private: Ray is pinned to 2.60

    address = services.find_bootstrap_address(None)
    return address if address and address in services.find_gcs_addresses() else None


class _held_stderr:
    """Hold what this process (and its C++ core) writes to stderr meanwhile; replay it unless `drop`."""

    def __enter__(self):
        import sys
        import tempfile

        sys.stderr.flush()
        self.file = tempfile.TemporaryFile()
        self.saved = os.dup(2)
        os.dup2(self.file.fileno(), 2)
        self.drop = False
        return self

    def text(self) -> str:
        self.file.seek(0)
        return self.file.read().decode(errors="replace")

    def __exit__(self, *exc) -> None:
        import sys

        sys.stderr.flush()
        os.dup2(self.saved, 2)
        os.close(self.saved)
        if not self.drop:
            sys.stderr.write(self.text())
        self.file.close()


TOKEN_FILE = os.path.join("~", ".ray", "auth_token")


def connection_message(address: str, error: BaseException, stderr: str, auth_mode: str | None = None,
                       token_file: str | None = None) -> str:
    """One line for a failed connection to a cluster, naming token authentication when it is the cause:
    Ray 2.60 turns it on for a head started where a token exists, and then refuses a driver without
    RAY_AUTH_MODE=token (its core logs `InvalidAuthToken`; the exception only says it failed to connect)."""
    auth_mode = os.environ.get("RAY_AUTH_MODE") if auth_mode is None else auth_mode
    token_file = os.path.expanduser(TOKEN_FILE) if token_file is None else token_file
    where = f"cannot connect to the Ray cluster at {address} (ray.address / RAY_ADDRESS)"
    if "InvalidAuthToken" in stderr or "Unauthenticated" in stderr or "InvalidAuthToken" in str(error):
        if auth_mode != "token":
            return (f"{where}: it requires Ray's token authentication and this process sends no token: set "
                    f"RAY_AUTH_MODE=token (Ray then reads the token from RAY_AUTH_TOKEN or {TOKEN_FILE}; on another "
                    "machine than the head, copy the head's token there)")
        return (f"{where}: it refused this process's authentication token: RAY_AUTH_TOKEN or {TOKEN_FILE} must hold "
                "the token the head uses (its ~/.ray/auth_token)")
    hint = ""
    if auth_mode != "token" and os.path.exists(token_file):
        hint = (f"; if the cluster uses token authentication (this machine has a token in {TOKEN_FILE}), set "
                "RAY_AUTH_MODE=token")
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return f"{where}: {first}{hint}"


def logs_dir() -> str | None:
    """The log folder of the Ray session this process is connected to (None without Ray)."""
    import sys

    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    try:
        return ray._private.worker._global_node.get_logs_dir_path()  # private: Ray is pinned to 2.60
    except AttributeError:
        return None


def logs_hint() -> str:
    """'. Ray's logs: <this session's log folder>' for messages, or '' without Ray."""
    d = logs_dir()
    if d is None:
        return ""
    cluster = "" if is_local_session() else " (on each node of the cluster)"
    return f". Ray's logs: {d}{cluster}"


def is_local_session() -> bool:
    return not os.environ.get("RAY_ADDRESS") and not _connected_address


_connected_address: str | None = None


_fits: set[frozenset] = set()  # requests seen to fit: one look at the cluster per kind of request


def check_fits(request: dict[str, float], key: str) -> None:
    """Refuse, before it waits, a request (per worker or actor: {"CPU": 2, "GPU": 1}) that no node of this
    machine's Ray can hold: Ray would queue it for ever. On a cluster an autoscaler may add such a node:
    there it is said, not refused."""
    import ray

    need = {k: v for k, v in request.items() if v}
    if not need or frozenset(need.items()) in _fits:
        return
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if any(all(r.get(k, 0) >= v for k, v in need.items()) for r in nodes):
        _fits.add(frozenset(need.items()))  # nodes come and go, but one that held it once will do again
        return
    asked = ", ".join(f"{v:g} {k}" for k, v in need.items())
    largest = ", ".join(f"{max((r.get(k, 0) for r in nodes), default=0):g} {k}" for k in need)
    if is_local_session():
        more = " (ray.num_cpus)" if "CPU" in need else ""
        raise ConfigError(f"{key}: each asks for {asked}, but this machine's Ray has {largest}: it would wait for ever; "
                          f"ask for less, or give the local Ray more{more}")
    log.warning(f"[ray] {key}: each asks for {asked}, and no node of the cluster has that much now (the largest: "
                f"{largest}); it waits until the autoscaler adds one")


def jobs_that_fit(cpus_per_job: float) -> int:
    """Training jobs (students, sweep trials) that fit the cluster at once, one CPU left for Ray Data's
    reads (without it they never start beside the Train workers)."""
    import ray

    return max(1, int((ray.cluster_resources().get("CPU", 1) - 1) // cpus_per_job))


def is_local(ray_cfg) -> bool:
    """No cluster to connect to: raykd starts (or has started) a Ray of its own on this machine."""
    return not (ray_cfg.address or os.environ.get("RAY_ADDRESS") or _connected_address)


def in_process(cfg, parallel: int, workers) -> bool:
    """A lone one-worker job on this machine runs in this process (`run.in_process`): Ray would add its
    start-up (seconds) and a worker process, and nothing the job uses."""
    return cfg.run.in_process and parallel == 1 and workers.num_workers == 1 and is_local(cfg.ray)


def concurrent_jobs(ray_cfg, cpus_per_job: float, workers_per_job: int = 1) -> int:
    """Training jobs (teachers, students, sweep trials) to run at once by default: as many as the cluster's
    CPUs fit, one left for Ray Data's reads; on a local Ray also no more than one worker per core, so
    that their torch threads (`local_thread_share`) never share a core."""
    n = jobs_that_fit(cpus_per_job)
    if is_local(ray_cfg):
        n = min(n, max(1, (os.cpu_count() or 1) // max(1, workers_per_job)))
    return n


def local_thread_share(ray_cfg, procs: int) -> int | None:
    """Torch threads for each of `procs` busy processes sharing this machine's cores under a local Ray;
    None on an existing cluster, where the driver cannot see the nodes' cores (workers decide there)."""
    if not is_local(ray_cfg):
        return None
    return max(1, (os.cpu_count() or 1) // max(1, procs))


def scaling(workers, use_gpu: bool):
    """Ray Train's ScalingConfig from a `*.workers` config section."""
    import ray.train

    res = {"CPU": workers.cpus_per_worker, **({"GPU": workers.gpus_per_worker} if use_gpu else {})}
    return ray.train.ScalingConfig(num_workers=workers.num_workers, use_gpu=use_gpu, resources_per_worker=res,
                                   placement_strategy=workers.placement)


def train_storage(cfg) -> dict:
    """Ray Train's RunConfig storage arguments: `run.storage_path` (a URI such as s3://bucket/prefix, or a
    local path) or <out_dir>/ray_train. An S3 URI with an endpoint (cache.s3_endpoint, AWS_ENDPOINT_URL)
    gets a pyarrow S3 filesystem pointed at it; credentials stay in the environment."""
    path = cfg.run.storage_path or os.path.join(os.path.abspath(cfg.run.out_dir), "ray_train")
    if "://" not in path:
        return {"storage_path": os.path.abspath(path)}
    scheme, rest = path.split("://", 1)
    endpoint = cfg.cache.s3_endpoint or os.environ.get("AWS_ENDPOINT_URL")
    if scheme in ("s3", "s3a") and endpoint:
        from pyarrow import fs

        s3 = fs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=False)
        return {"storage_path": rest.rstrip("/"), "storage_filesystem": s3}
    return {"storage_path": path}


def resolve_device(preference: str) -> str:
    """'cpu', 'cuda' or 'auto' -> the device Train workers use, judged from the cluster's GPUs."""
    import sys

    ray = sys.modules.get("ray")  # not imported: a job in this process, and no Ray to ask
    if ray is not None and ray.is_initialized():
        gpus = ray.cluster_resources().get("GPU", 0)
    else:  # a job in this process, on this machine
        import torch

        gpus = torch.cuda.device_count()
    if preference == "cuda" and gpus == 0:
        raise ConfigError("run.device=cuda but the Ray cluster has no GPU; use run.device=cpu or auto")
    if preference == "auto":
        return "cuda" if gpus > 0 else "cpu"
    return preference
