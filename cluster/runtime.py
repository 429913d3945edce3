"""Where Ray runs: an embedded local instance by default, or an existing cluster.

``ray_runtime()`` is the one entry point every job uses:

- no address and no ``RAY_ADDRESS``: start an embedded local Ray sized to this machine (dashboard off,
  worker logs not forwarded when ``quiet``) and shut it down on exit; it is always a new instance of its
  own (``ray.init(address="local")``), never a Ray that ``ray start`` left running on this machine;
- ``address="auto"``, ``"ray://host:10001"``, ``"host:6379"`` or ``RAY_ADDRESS`` (what ``ray job submit``
  sets for its entrypoint): join that cluster and only disconnect on exit; the cluster keeps running;
- Ray already initialised in this process (a test fixture, a caller that set Ray up itself): reuse it
  and leave it alone on exit.

Ray is imported inside the functions so that importing this module costs nothing.

Token authentication (Ray ≥ 2.59 turns it on for every new local ``ray.init()``): Ray generates
``~/.ray/auth_token`` on first use. Two processes starting their first embedded Ray at the same moment
would both generate and write that file, and one cluster's processes could read a token its driver
does not hold; so the embedded path creates the file itself first, atomically and readable only by
its owner, when token auth is in effect and no token is configured (or, where the home folder is
read-only, puts a fresh token in this process's ``RAY_AUTH_TOKEN``). Nothing else about authentication
is set here: joining a token-protected cluster needs ``RAY_AUTH_MODE=token`` and the cluster's token
(``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``) in the environment.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipscope.errors import ConfigError

logger = logging.getLogger(__name__)

# Ray's own logger for the "token authentication is enabled" notice printed by every new local init.
_RAY_AUTH_SETUP_LOGGER = "ray._private.authentication.authentication_token_setup"
_LOCAL_ADDRESSES = (None, "", "local")
_LOCAL_SCHEMES = ("file", "local")
# fsspec schemes whose data lives inside one Python process: no Ray worker can ever see it.
_PROCESS_SCHEMES = ("memory",)


@dataclass(frozen=True)
class RayRuntime:
    """What ``ray_runtime`` connected to.

    mode: "embedded" (a local Ray this context started), "cluster" (joined an existing cluster) or
    "reused" (Ray was already initialised in this process). address: the address asked for, or None.
    """

    mode: str
    address: str | None

    @property
    def owns_ray(self) -> bool:
        """True when leaving the context shuts Ray down (embedded) or disconnects (cluster)."""
        return self.mode != "reused"


@dataclass(frozen=True)
class NodeInfo:
    """One alive Ray node as the scheduler sees it."""

    node_id: str
    address: str
    hostname: str
    is_head: bool
    num_cpus: float
    num_gpus: float
    memory_bytes: float


def _import_ray():
    import ray

    return ray


ADDRESS_FORMS = "auto, HOST:PORT or ray://HOST:10001"
# How long a TCP connection to a cluster address may take before it counts as unreachable: Ray itself
# retries an unreachable GCS for minutes before giving up.
_REACH_TIMEOUT_S = 5.0


def check_address(value: Any, name: str = "address") -> str:
    """``value`` if it is a cluster address (``auto``, ``HOST:PORT`` or ``ray://HOST[:PORT]``), else
    ConfigError naming ``name`` (the parameter, flag or environment variable it came from)."""
    text = value.strip() if isinstance(value, str) else None
    if not text:
        raise ConfigError(f"{name} must be {ADDRESS_FORMS}, got {value!r}")
    if text == "auto":
        return text
    if text.startswith(("http://", "https://")):
        raise ConfigError(f"{name} must be {ADDRESS_FORMS}, got {value!r} (an http address is the job API, "
                          "for `ray job submit --address`)")
    rest = text[len("ray://"):] if text.startswith("ray://") else text
    host, sep, port = rest.rpartition(":")
    if text.startswith("ray://") and not sep:
        host, port = rest, "10001"
    if "://" in rest or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{name} must be {ADDRESS_FORMS}, got {value!r}")
    return text


def _host_port(address: str) -> tuple[str, int] | None:
    """Where a TCP connection must succeed for ``address`` to be reachable (None for ``auto``)."""
    if address == "auto":
        return None
    rest = address[len("ray://"):] if address.startswith("ray://") else address
    host, sep, port = rest.rpartition(":")
    if not sep:
        return rest, 10001
    return host.strip("[]"), int(port)


def _check_reachable(address: str) -> None:
    target = _host_port(address)
    if target is None:
        return
    import socket

    try:
        with socket.create_connection(target, timeout=_REACH_TIMEOUT_S):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ConfigError(f"cannot reach the Ray cluster at {address!r} ({reason.lower()}); "
                          "is `ray start --head` running there?") from None


def _resolve_address(address: str | None) -> str | None:
    if address is not None and not isinstance(address, str):
        raise ConfigError(f"address must be a string or None, got {type(address).__name__}")
    chosen = address if address not in _LOCAL_ADDRESSES else None
    if chosen is None and address is None:
        chosen = os.environ.get("RAY_ADDRESS") or None
    return chosen


def _check_count(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ConfigError(f"{name} must be an integer ≥ 0 or None, got {value!r}")


def _default_token_path() -> Path:
    return Path.home() / ".ray" / "auth_token"


def _token_auth_expected() -> bool:
    """Whether a new local ``ray.init()`` of this Ray version will run with token authentication."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None:
        return mode.strip().lower() == "token"
    try:
        from ray._private.authentication import authentication_token_setup as setup
    except ImportError:  # Ray < 2.52 has no token authentication
        return False
    # Ray versions that turn token auth on for new local clusters ship this function.
    return hasattr(setup, "enable_token_auth_by_default")


def _reset_token_cache() -> None:
    """Make Ray's in-process token loader read the token sources again (it caches what it found)."""
    try:
        from ray._raylet import AuthenticationTokenLoader
    except ImportError:  # Ray < 2.52 has no token authentication
        return
    AuthenticationTokenLoader.instance().reset_cache()


def ensure_local_auth_token() -> Path | None:
    """Create ``~/.ray/auth_token`` (mode 0600) when token auth is in effect and no token is configured.

    Returns the path created, or None when nothing was needed. Atomic: the token is written to a
    temporary file and hard-linked into place, so concurrent first starts agree on one token.
    """
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return None
    if not _token_auth_expected():
        return None
    path = _default_token_path()
    if path.exists():
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".auth_token.", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp_name, path)
        except FileExistsError:
            return None  # another process won the race; its token is the one everybody uses
    finally:
        os.unlink(tmp_name)
    _reset_token_cache()
    return path


def prepare_embedded_auth() -> None:
    """Make sure a new embedded Ray finds a token when it will run with token authentication.

    Normally that is ``ensure_local_auth_token()``. Where the home folder cannot be written (read-only
    containers), the token goes into this process's ``RAY_AUTH_TOKEN`` instead, which the embedded
    Ray's processes inherit; Ray would otherwise fail to start.
    """
    try:
        ensure_local_auth_token()
    except OSError as err:
        logger.warning(
            "cannot write %s (%s); the embedded Ray uses a token kept in this process's environment",
            _default_token_path(),
            err,
        )
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
        _reset_token_cache()


@contextlib.contextmanager
def _quiet_ray_auth_notice(quiet: bool) -> Iterator[None]:
    if not quiet:
        yield
        return
    auth_logger = logging.getLogger(_RAY_AUTH_SETUP_LOGGER)
    previous = auth_logger.level
    auth_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        auth_logger.setLevel(previous)


@contextlib.contextmanager
def ray_runtime(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    object_store_memory: int | None = None,
    runtime_env: dict[str, Any] | None = None,
    quiet: bool = True,
) -> Iterator[RayRuntime]:
    """Run the body with Ray available; see the module docstring for the three modes.

    num_cpus / num_gpus / object_store_memory size an embedded Ray (None: Ray detects the machine)
    and are refused when joining a cluster, whose size is its own. runtime_env is passed to
    ``ray.init`` (e.g. ``{"py_modules": [...]}`` to ship code to nodes that lack it). quiet: Ray logs
    at WARNING and worker stdout/stderr is not forwarded to this process.
    """
    _check_count("num_cpus", num_cpus)
    _check_count("num_gpus", num_gpus)
    _check_count("object_store_memory", object_store_memory)
    target = _resolve_address(address)
    ray = _import_ray()

    if ray.is_initialized():
        logger.debug("Ray already initialised in this process; reusing it")
        yield RayRuntime(mode="reused", address=target)
        return

    common: dict[str, Any] = dict(
        log_to_driver=not quiet,
        configure_logging=True,
        logging_level=logging.WARNING if quiet else logging.INFO,
        runtime_env=runtime_env,
    )
    if target is None:
        prepare_embedded_auth()
        with _quiet_ray_auth_notice(quiet):
            # address="local": always a new instance of our own. Without it ray.init() attaches to a
            # Ray already running on this machine (`ray start`, found through /tmp/ray/ray_current_cluster)
            # and then refuses num_cpus ("When connecting to an existing cluster, num_cpus and num_gpus
            # must not be provided").
            ray.init(
                address="local",
                num_cpus=num_cpus,
                num_gpus=num_gpus,
                object_store_memory=object_store_memory,
                include_dashboard=False,
                **common,
            )
        info = RayRuntime(mode="embedded", address=None)
    else:
        sized = {"num_cpus": num_cpus, "num_gpus": num_gpus, "object_store_memory": object_store_memory}
        given = [name for name, value in sized.items() if value is not None]
        if given:
            raise ConfigError(
                f"{', '.join(given)} size an embedded local Ray only; got them with cluster address {target!r}"
            )
        target = check_address(target, "address" if address is not None else "RAY_ADDRESS")
        _check_reachable(target)
        try:
            ray.init(address=target, **common)
        except (ConnectionError, TimeoutError, ValueError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            if target == "auto" and "Could not find any running Ray instance" in reason:
                reason = "no Ray is running on this machine; start one with `ray start --head` or pass HOST:PORT"
            raise ConfigError(f"cannot join the Ray cluster at {target!r}: {reason}") from None
        info = RayRuntime(mode="cluster", address=target)
    try:
        yield info
    finally:
        # For a joined cluster this only disconnects the driver; the cluster keeps running.
        ray.shutdown()


def _require_ray_initialised(ray: Any, what: str) -> None:
    if not ray.is_initialized():
        raise ConfigError(f"{what} needs a running Ray; call it inside `with ray_runtime(...)`")


def cluster_nodes() -> tuple[NodeInfo, ...]:
    """The alive nodes of the connected cluster, head first."""
    ray = _import_ray()
    _require_ray_initialised(ray, "cluster_nodes()")
    nodes = []
    for entry in ray.nodes():
        if not entry.get("Alive", False):
            continue
        resources = entry.get("Resources", {})
        nodes.append(
            NodeInfo(
                node_id=entry["NodeID"],
                address=entry.get("NodeManagerAddress", ""),
                hostname=entry.get("NodeManagerHostname", ""),
                is_head="node:__internal_head__" in resources,
                num_cpus=float(resources.get("CPU", 0.0)),
                num_gpus=float(resources.get("GPU", 0.0)),
                memory_bytes=float(resources.get("memory", 0.0)),
            )
        )
    nodes.sort(key=lambda node: (not node.is_head, node.address, node.node_id))
    return tuple(nodes)


def describe_cluster(nodes: tuple[NodeInfo, ...] | None = None) -> str:
    """One line for logs: node count, CPUs, GPUs and the head's address."""
    nodes = cluster_nodes() if nodes is None else nodes
    cpus = sum(node.num_cpus for node in nodes)
    gpus = sum(node.num_gpus for node in nodes)
    head = next((node.address for node in nodes if node.is_head), "?")
    plural = "" if len(nodes) == 1 else "s"
    return f"Ray: {len(nodes)} node{plural}, {cpus:g} CPUs, {gpus:g} GPUs (head {head})"


def store_url_scope(url: str | os.PathLike[str]) -> str:
    """"local" (a path on this machine), "process" (memory://: one process only) or "shared"."""
    text = os.fspath(url) if isinstance(url, os.PathLike) else url
    if not isinstance(text, str) or not text:
        raise ConfigError(f"store url must be a non-empty path or URL string, got {url!r}")
    if "://" not in text:
        return "local"
    scheme = text.split("://", 1)[0].lower()
    if scheme in _PROCESS_SCHEMES:
        return "process"
    # Windows drive letters ("C://…" after normalisation) are local paths too.
    if scheme in _LOCAL_SCHEMES or len(scheme) == 1:
        return "local"
    return "shared"


def check_shared_store(url: str | os.PathLike[str], *, alive_nodes: int, allow_local: bool = False) -> None:
    """Raise ConfigError when Ray workers on ``alive_nodes`` nodes could not all reach the store at url."""
    scope = store_url_scope(url)
    if scope == "process":
        raise ConfigError(
            f"store url {os.fspath(url)!r} lives in one Python process and Ray workers run in others; "
            "use a local path, a shared filesystem, s3:// or gs://"
        )
    if scope == "local" and alive_nodes > 1 and not allow_local:
        raise ConfigError(
            f"store {os.fspath(url)!r} is a local path but the Ray cluster has {alive_nodes} alive nodes; "
            "use s3:// or gs://, or a shared filesystem mounted at the same path on every node "
            "(then pass --allow-local-store)"
        )


def require_shared_store(url: str | os.PathLike[str], *, allow_local: bool = False) -> None:
    """Refuse a store the connected cluster's workers cannot all reach (see ``check_shared_store``)."""
    check_shared_store(url, alive_nodes=len(cluster_nodes()), allow_local=allow_local)
