"""A run's command inside a container: Apptainer, Docker or Podman, or NVIDIA pyxis (srun flags).

submitit's process stays on the host, where `scontrol requeue` works; the training is its child,
started from the argv that `task_command` builds (the job's GPUs are put into it when the task
starts: `bind_job_gpus`). The exception is pyxis, where srun starts the whole submitit process
inside the image (see `srun_args`).

`container.env` never goes on a command line, where every user of the node can read it (`ps`):
`write_env_file` puts it in `<output>/.samat/container.env`, readable by the user alone, which
docker/podman (`--env-file`, one literal NAME=value a line) and Apptainer (`--env-file`, read as
shell assignments, so each value is single-quoted) read, and pyxis' sbatch script sources.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import shlex
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from samat.config import ConfigError, ContainerConfig, SlurmConfig
from samat.files import write_atomic

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
# Where a grid's container environment is written, under its output directory.
ENV_FILE = Path(".samat") / "container.env"
# A GPU in SLURM_JOB_GPUS / CUDA_VISIBLE_DEVICES: an index or a UUID (GPU-xxxxxxxx-...).
_GPU_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
# Apptainer and pyxis take lists of mounts joined by commas; each part is split at colons.
_LIST_RUNTIMES = ("apptainer", "pyxis")


def wrap(
    cfg: ContainerConfig,
    argv: Sequence[str],
    *,
    workdirs: Sequence[Path] = (),
    name: str | None = None,
    env_file: Path | None = None,
    cpus: int | None = None,
    mem_gb: float | None = None,
) -> list[str]:
    """The argv that runs `argv` in cfg's container; each workdir is bound at its own path.

    Runtime none, and pyxis (where the calling process already runs in the container), return
    argv unchanged. `name` names a docker/podman container (podman replaces one left over).
    `env_file` is the file `write_env_file` wrote for cfg (needed when cfg.env is set); `cpus`
    and `mem_gb` limit a docker/podman container as SLURM limits the job (its daemon runs the
    container outside the job's cgroup).
    """
    if cfg.runtime in ("none", "pyxis"):
        return list(argv)
    if not argv:
        raise ValueError("wrap() needs a command to run in the container")
    if cfg.env and env_file is None:
        raise ValueError("container.env goes through a file: write_env_file(), then env_file=")
    mounts = _mounts(cfg, workdirs)
    if cfg.runtime == "apptainer":
        return _apptainer(cfg, mounts, argv, env_file)
    return _docker(cfg, mounts, argv, name, env_file, cpus, mem_gb)


def task_command(
    cfg: ContainerConfig,
    run_dir: Path,
    *,
    output_root: Path | None = None,
    slurm: SlurmConfig | None = None,
) -> list[str]:
    """The argv that runs one run directory in the container (`samat run RUN_DIR`).

    output_root (the grid's output directory, by default the run directory's grandparent,
    `<output>/runs/<run_id>`) is bound at its own path so that the run directory is visible;
    cfg.env is read from its ENV_FILE. `slurm` gives the container's CPU and memory limits and,
    when cfg.gpu is None, whether it gets GPUs (see `for_grid`).
    """
    run_dir = _absolute(run_dir)
    root = _absolute(output_root) if output_root is not None else run_dir.parent.parent
    if slurm is not None:
        cfg = for_grid(cfg, slurm)
    return wrap(
        cfg,
        ["samat", "run", str(run_dir)],
        workdirs=[root],
        name=container_name(run_dir),
        env_file=root / ENV_FILE if cfg.env else None,
        cpus=slurm.cpus_per_task if slurm is not None else None,
        mem_gb=slurm.mem_gb if slurm is not None else None,
    )


def for_grid(cfg: ContainerConfig, slurm: SlurmConfig) -> ContainerConfig:
    """cfg with `gpu` decided: None follows the grid's GPU request (slurm.gpus_per_node > 0)."""
    if cfg.gpu is not None:
        return cfg
    return cfg.model_copy(update={"gpu": slurm.gpus_per_node > 0})


def _gpu(cfg: ContainerConfig) -> bool:
    # outside a grid, None follows SlurmConfig's default request of one GPU
    return cfg.gpu if cfg.gpu is not None else SlurmConfig().gpus_per_node > 0


def env_file_text(cfg: ContainerConfig) -> str:
    """cfg.env as the runtime reads its env file: literal NAME=value lines for docker/podman,
    single-quoted shell assignments for Apptainer (whose --env-file is shell) and pyxis (sourced
    by the sbatch script)."""
    if cfg.runtime == "docker":
        return "".join(f"{name}={value}\n" for name, value in cfg.env.items())
    return "".join(f"{name}={shlex.quote(value)}\n" for name, value in cfg.env.items())


def write_env_file(cfg: ContainerConfig, output: Path) -> Path | None:
    """Write cfg.env to `<output>/.samat/container.env`, readable by the user alone (0600 in a
    0700 folder), atomically; None (and nothing written) when cfg.env is empty."""
    if not cfg.env:
        return None
    path = _absolute(output) / ENV_FILE
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    write_atomic(path, env_file_text(cfg).encode(), mode=0o600)  # secrets: the user alone
    return path


def job_gpus(environ: Mapping[str, str]) -> list[str] | None:
    """The GPUs this job was given, as the host numbers them: SLURM_JOB_GPUS (SLURM's own ids,
    also right outside the job's cgroup, where docker's daemon starts the container), else
    SLURM_STEP_GPUS, else CUDA_VISIBLE_DEVICES (local runs); None when none of them says."""
    for name in ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "CUDA_VISIBLE_DEVICES"):
        value = environ.get(name)
        if value is None:
            continue
        ids = [part.strip() for part in value.split(",") if part.strip()]
        if all(_GPU_ID.fullmatch(part) for part in ids):
            return ids
    return None


def bind_job_gpus(argv: Sequence[str], environ: Mapping[str, str]) -> list[str]:
    """A docker/podman argv from `wrap`, narrowed at task start to the job's own GPUs.

    `--gpus all` (docker) becomes `--gpus "device=<ids>"` and CDI's `nvidia.com/gpu=all` (podman)
    one `--device nvidia.com/gpu=<id>` per GPU; CUDA_VISIBLE_DEVICES is then not passed on, as
    the container numbers its GPUs from 0. A SLURM job without GPUs gets none; outside SLURM with
    no GPU list the container keeps all of them. Other argvs come back unchanged.
    """
    argv = list(argv)
    end = argv.index("--entrypoint") if "--entrypoint" in argv else len(argv)
    options = argv[:end]
    ids = job_gpus(environ)
    if not _has_gpu_flags(options) or (ids is None and "SLURM_JOB_ID" not in environ):
        return argv
    # docker's --gpus value is a CSV field: the quotes keep "device=0,1" one field
    replacements = {
        ("--gpus", "all"): ["--gpus", '"device=' + ",".join(ids) + '"'] if ids else [],
        ("--device", "nvidia.com/gpu=all"): [
            arg for gpu in ids or [] for arg in ("--device", f"nvidia.com/gpu={gpu}")
        ],
        ("--env", "CUDA_VISIBLE_DEVICES"): [],
    }
    narrowed: list[str] = []
    index = 0
    while index < len(options):
        pair = tuple(options[index : index + 2])
        if pair in replacements:
            narrowed += replacements[pair]
            index += 2
        else:
            narrowed.append(options[index])
            index += 1
    return narrowed + argv[end:]


def _has_gpu_flags(options: Sequence[str]) -> bool:
    pairs = set(itertools.pairwise(options))
    return ("--gpus", "all") in pairs or ("--device", "nvidia.com/gpu=all") in pairs


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
    environment (see `env_setup`); --container-env makes them override the image's.
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


def env_setup(cfg: ContainerConfig, output: Path) -> list[str]:
    """Shell lines (for the sbatch script's setup) that export cfg.env from the grid's env file,
    for pyxis: the values stay out of the script, which SLURM and the submitit folder keep."""
    if not cfg.env:
        return []
    path = shlex.quote(str(_absolute(output) / ENV_FILE))
    return ["set -a", f". {path}", "set +a"]


def image_python(cfg: ContainerConfig) -> str:
    """The image's python that runs submitit under pyxis (container.python), shell-quoted."""
    return shlex.quote(cfg.python) if cfg.python else IMAGE_PYTHON


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
    for name in cfg.env:
        if not _ENV_NAME.fullmatch(name):
            raise ConfigError(
                f"container.env: {name!r} is not a variable name; use letters, digits and _"
            )
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
    cfg: ContainerConfig,
    mounts: list[tuple[str, ...]],
    argv: Sequence[str],
    env_file: Path | None,
) -> list[str]:
    command = [cfg.executable or "apptainer", "exec"]
    if _gpu(cfg):
        command.append("--nv")
    for mount in mounts:
        command += ["--bind", ":".join(mount)]
    if cfg.env:
        # --env-file is read by a shell interpreter (the values are single-quoted in it);
        # --no-eval: the values are then not shell-expanded ($, `, \) again inside the container
        command += ["--no-eval", "--env-file", str(_absolute(env_file))]
    return [*command, _image(cfg), *argv]


def _image(cfg: ContainerConfig) -> str:
    """The image, with a local file's path made absolute (tasks may start elsewhere)."""
    image = str(cfg.image)
    return str(_absolute(image)) if _is_local_image(cfg.runtime, image) else image


def _docker(
    cfg: ContainerConfig,
    mounts: list[tuple[str, ...]],
    argv: Sequence[str],
    name: str | None,
    env_file: Path | None,
    cpus: int | None,
    mem_gb: float | None,
) -> list[str]:
    executable = cfg.executable or "docker"
    # --init: an init process as PID 1 passes on SIGTERM (PID 1 itself would ignore it), so a
    # forwarded time-limit signal stops the run; --rm: one container per attempt, none left over
    command = [executable, "run", "--rm", "--init", *_docker_user(executable)]
    if name is not None:
        # a container that outlived its job must not train on beside the requeued attempt:
        # podman replaces it, docker refuses to start a second one
        command += ["--name", name, *(["--replace"] if _is_podman(executable) else [])]
    # the daemon starts the container outside the job's cgroup: give it the job's limits
    if cpus is not None:
        command += ["--cpus", str(cpus)]
    if mem_gb is not None:
        command += ["--memory", f"{round(mem_gb * 1024)}m"]
    if _gpu(cfg):
        # podman reaches GPUs through CDI (nvidia-ctk cdi generate), docker through --gpus; the
        # task narrows `all` to the job's GPUs when it starts (bind_job_gpus); the bare --env
        # passes CUDA_VISIBLE_DEVICES as the client sees it where no GPU list is known
        gpus = ["--device", "nvidia.com/gpu=all"] if _is_podman(executable) else ["--gpus", "all"]
        command += [*gpus, "--env", "CUDA_VISIBLE_DEVICES"]
    for mount in mounts:
        command += ["--volume", ":".join(mount)]
    if cfg.env:
        command += ["--env-file", str(_absolute(env_file))]
    # the image's entrypoint is `samat`; argv names its own program
    return [*command, "--entrypoint", argv[0], str(cfg.image), *argv[1:]]


def _docker_user(executable: str) -> list[str]:
    """Run as the calling user, so that files in bound directories belong to them, with their
    supplementary groups (a group-shared data set or output directory stays readable)."""
    uid, gid = os.getuid(), os.getgid()
    if _is_podman(executable) and uid != 0:
        # rootless podman: the user's own id inside, mapped back to them outside (the host's
        # other group ids are not mapped into its user namespace: no --group-add)
        return ["--userns=keep-id"]
    groups = [] if _is_podman(executable) else sorted(set(os.getgroups()) - {gid})
    return ["--user", f"{uid}:{gid}", *[arg for g in groups for arg in ("--group-add", str(g))]]


def _is_podman(executable: str) -> bool:
    return Path(executable).name.startswith("podman")


def _absolute(path: Path | str) -> Path:
    return Path(os.path.abspath(os.path.expanduser(path)))
