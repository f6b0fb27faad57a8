"""A run's command inside a container: Apptainer, Docker or Podman, or NVIDIA pyxis (srun flags).

submitit's process stays on the host, where `scontrol requeue` works; the training is its child,
started from the argv that `task_command` builds. The exception is pyxis, where srun starts the
whole submitit process inside the image (see `srun_args`).
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
from collections.abc import Sequence
from pathlib import Path

from samat.config import ConfigError, ContainerConfig

# Images that Apptainer and pyxis fetch themselves: no local file has to exist.
REMOTE_PREFIXES = (
    "docker://",
    "docker-daemon:",
    "oras://",
    "library://",
    "shub://",
    "http://",
    "https://",
)
# samat's python in the image the repository's Dockerfile builds (pyxis runs submitit with it).
IMAGE_PYTHON = "/opt/venv/bin/python"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Apptainer and pyxis take lists of mounts joined by commas; each part is split at colons.
_LIST_RUNTIMES = ("apptainer", "pyxis")


def wrap(
    cfg: ContainerConfig,
    argv: Sequence[str],
    *,
    workdirs: Sequence[Path] = (),
    name: str | None = None,
) -> list[str]:
    """The argv that runs `argv` in cfg's container; each workdir is bound at its own path.

    Runtime none, and pyxis (where the calling process already runs in the container), return
    argv unchanged. `name` names a docker/podman container (podman replaces one left over).
    """
    if cfg.runtime in ("none", "pyxis"):
        return list(argv)
    if not argv:
        raise ValueError("wrap() needs a command to run in the container")
    mounts = _mounts(cfg, workdirs)
    if cfg.runtime == "apptainer":
        return _apptainer(cfg, mounts, argv)
    return _docker(cfg, mounts, argv, name)


def task_command(
    cfg: ContainerConfig, run_dir: Path, *, output_root: Path | None = None
) -> list[str]:
    """The argv that runs one run directory in the container (`samat run RUN_DIR`).

    output_root (the grid's output directory, by default the run directory's grandparent,
    `<output>/runs/<run_id>`) is bound at its own path so that the run directory is visible.
    """
    run_dir = _absolute(run_dir)
    root = _absolute(output_root) if output_root is not None else run_dir.parent.parent
    return wrap(cfg, ["samat", "run", str(run_dir)], workdirs=[root], name=container_name(run_dir))


def container_name(run_dir: Path) -> str:
    """The docker/podman container name of a run: its run id and a hash of its directory."""
    run_dir = _absolute(run_dir)
    return f"samat-{run_dir.name}-{hashlib.sha1(str(run_dir).encode()).hexdigest()[:8]}"


def stop_command(cfg: ContainerConfig, run_dir: Path) -> list[str]:
    """The argv that stops a run's docker/podman container (empty for the other runtimes).

    Docker's and podman's containers live under their daemon or conmon, outside the SLURM job:
    when SLURM signals every process of a job at once (scancel, preemption), the client's own
    signal forwarding can fail and leave the container running. Apptainer's container is a plain
    child process and goes with the job.
    """
    if cfg.runtime != "docker":
        return []
    return [cfg.executable or "docker", "kill", "--signal", "TERM", container_name(run_dir)]


def srun_args(cfg: ContainerConfig, *, workdirs: Sequence[Path] = ()) -> list[str]:
    """srun flags that start each task in cfg's image through NVIDIA pyxis.

    With pyxis the whole submitit process runs inside the image, so its python must be the
    image's (`SlurmExecutor(python=IMAGE_PYTHON)`), and requeueing on the time limit needs
    `scontrol`, the cluster's slurm.conf and the munge socket inside the image: a known limit
    of submitit under pyxis. Without them the task stops at its time limit unrequeued, and
    resubmitting the grid resumes it from its checkpoint. Values of cfg.env must be in the job's
    environment (see `env_exports`); --container-env makes them override the image's.
    """
    if cfg.runtime != "pyxis":
        raise ValueError(f"srun_args() is for runtime 'pyxis', not {cfg.runtime!r}")
    args = [f"--container-image={_image(cfg)}"]
    mounts = _mounts(cfg, workdirs)
    if mounts:
        args.append("--container-mounts=" + ",".join(":".join(m) for m in mounts))
    if cfg.env:
        args.append("--container-env=" + ",".join(cfg.env))
    return args


def env_exports(cfg: ContainerConfig) -> list[str]:
    """Shell lines (for the sbatch script's setup) that export cfg.env, for pyxis."""
    return [f"export {name}={shlex.quote(value)}" for name, value in cfg.env.items()]


def validate(cfg: ContainerConfig) -> list[str]:
    """Check cfg on the submitting node: ConfigError for what cannot work, warnings for the rest.

    A missing runtime executable is only a warning: clusters often install Apptainer on the
    compute nodes alone.
    """
    if cfg.runtime == "none":
        return []
    for bind in cfg.binds:
        host, _, _ = _parse_bind(bind, cfg.runtime)
        if not Path(host).exists():
            raise ConfigError(
                f"container.binds: host path {host!r} does not exist; create it or fix the bind"
            )
    for name, value in cfg.env.items():
        if not _ENV_NAME.fullmatch(name):
            raise ConfigError(
                f"container.env: {name!r} is not a variable name; use letters, digits and _"
            )
        if cfg.runtime == "apptainer":
            _apptainer_env(name, value)
    image = str(cfg.image)
    if _is_local_image(cfg.runtime, image) and not Path(image).expanduser().exists():
        raise ConfigError(
            f"container.image {image!r} does not exist; build it (see "
            "docs/containers.md) or give its path"
        )
    warnings = []
    executable = cfg.executable or ("srun" if cfg.runtime == "pyxis" else cfg.runtime)
    if shutil.which(executable) is None:
        warnings.append(
            f"container runtime {executable!r} is not on this node's PATH; fine if the "
            "compute nodes have it"
        )
    return warnings


def _is_local_image(runtime: str, image: str) -> bool:
    if image.startswith(REMOTE_PREFIXES):
        return False
    if runtime == "apptainer":
        return True
    # pyxis takes a squashfs file or a registry reference such as nvcr.io#nvidia/pytorch:24.05
    return runtime == "pyxis" and (image.startswith(("/", "./", "~")) or image.endswith(".sqsh"))


def _parse_bind(bind: str, runtime: str) -> tuple[str, str, str | None]:
    """host, container and options of a `host:container[:opts]` bind; ConfigError if malformed."""
    parts = bind.split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise ConfigError(
            f"container.binds: {bind!r} is not host:container[:options]; "
            "write it like /data:/data:ro"
        )
    host, target = parts[:2]
    if not target.startswith("/"):
        raise ConfigError(
            f"container.binds: container path {target!r} in {bind!r} must be absolute"
        )
    if runtime in _LIST_RUNTIMES and "," in bind:
        raise ConfigError(
            f"container.binds: {runtime} cannot bind {bind!r} (commas separate "
            "its binds); rename the path"
        )
    return str(_absolute(host)), target, parts[2] if len(parts) == 3 else None


def _mounts(cfg: ContainerConfig, workdirs: Sequence[Path]) -> list[tuple[str, ...]]:
    """(host, container[, options]) for cfg.binds, then each workdir at its own path."""
    mounts = []
    for bind in cfg.binds:
        host, target, options = _parse_bind(bind, cfg.runtime)
        mounts.append((host, target) if options is None else (host, target, options))
    for workdir in workdirs:
        path = str(_absolute(workdir))
        if ":" in path or (cfg.runtime in _LIST_RUNTIMES and "," in path):
            raise ConfigError(
                f"{cfg.runtime} cannot bind {path!r} (it splits binds at ':' and "
                "','); choose an output directory without them"
            )
        if (path, path) not in mounts:
            mounts.append((path, path))
    return mounts


def _apptainer(
    cfg: ContainerConfig, mounts: list[tuple[str, ...]], argv: Sequence[str]
) -> list[str]:
    command = [cfg.executable or "apptainer", "exec"]
    if cfg.gpu:
        command.append("--nv")
    for mount in mounts:
        command += ["--bind", ":".join(mount)]
    if cfg.env:
        # --no-eval: values are taken literally, not shell-expanded ($, `, \) inside the container
        command.append("--no-eval")
    for name, value in cfg.env.items():
        command += ["--env", _apptainer_env(name, value)]
    return [*command, _image(cfg), *argv]


def _image(cfg: ContainerConfig) -> str:
    """The image, with a local file's path made absolute (tasks may start elsewhere)."""
    image = str(cfg.image)
    return str(_absolute(image)) if _is_local_image(cfg.runtime, image) else image


def _apptainer_env(name: str, value: str) -> str:
    """One --env item that Apptainer reads back as exactly name=value.

    Apptainer's parser (pflag's string map) takes an item with one '=' as it is, less any '"' at
    its ends, and splits an item with more at commas, as a CSV record.
    """
    item = f"{name}={value}"
    if "=" in value:
        return '"' + item.replace('"', '""') + '"'
    if value.endswith('"'):
        raise ConfigError(
            f"container.env.{name}: Apptainer drops a final '\"' from a value "
            "without '='; change the value"
        )
    return item


def _docker(
    cfg: ContainerConfig, mounts: list[tuple[str, ...]], argv: Sequence[str], name: str | None
) -> list[str]:
    executable = cfg.executable or "docker"
    # --init: an init process as PID 1 passes on SIGTERM (PID 1 itself would ignore it), so a
    # forwarded time-limit signal stops the run; --rm: one container per attempt, none left over
    command = [executable, "run", "--rm", "--init", *_docker_user(executable)]
    if name is not None:
        # a container that outlived its job must not train on beside the requeued attempt:
        # podman replaces it, docker refuses to start a second one
        command += ["--name", name, *(["--replace"] if _is_podman(executable) else [])]
    if cfg.gpu:
        # podman reaches GPUs through CDI (nvidia-ctk cdi generate), docker through --gpus; the
        # bare --env passes the job's CUDA_VISIBLE_DEVICES as the client sees it at start
        gpus = ["--device", "nvidia.com/gpu=all"] if _is_podman(executable) else ["--gpus", "all"]
        command += [*gpus, "--env", "CUDA_VISIBLE_DEVICES"]
    for mount in mounts:
        command += ["--volume", ":".join(mount)]
    for key, value in cfg.env.items():
        command += ["--env", f"{key}={value}"]
    # the image's entrypoint is `samat`; argv names its own program
    return [*command, "--entrypoint", argv[0], str(cfg.image), *argv[1:]]


def _docker_user(executable: str) -> list[str]:
    """Run as the calling user, so that files in bound directories belong to them."""
    uid, gid = os.getuid(), os.getgid()
    if _is_podman(executable) and uid != 0:
        # rootless podman: the user's own id inside, mapped back to them outside
        return ["--userns=keep-id"]
    return ["--user", f"{uid}:{gid}"]


def _is_podman(executable: str) -> bool:
    return Path(executable).name.startswith("podman")


def _absolute(path: Path | str) -> Path:
    return Path(os.path.abspath(os.path.expanduser(path)))
