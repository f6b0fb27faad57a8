"""One locked environment: requirements.lock (the images) and requirements-dev.lock (the tests
and CI) pin every package with its hashes, agree with pyproject.toml and with each other, and the
images' labels and every result name the versions that ran."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import samat
from tests.conftest import TINY_BASE

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11, as the lock

ROOT = Path(__file__).resolve().parents[1]


def pins(path: Path) -> dict[str, tuple[str, list[str]]]:
    """{package: (version, [sha256, ...])} of a pip-compile lock file."""
    found: dict[str, tuple[str, list[str]]] = {}
    name = None
    for line in path.read_text().splitlines():
        pin = re.match(r"^([A-Za-z0-9._-]+)==([^\s\\;]+)", line)
        if pin:
            name = canonicalize_name(pin.group(1))
            assert name not in found, f"{path.name}: {name} pinned twice"
            found[name] = (pin.group(2), [])
        hashed = re.search(r"--hash=sha256:([0-9a-f]{64})", line)
        if hashed and name is not None:
            found[name][1].append(hashed.group(1))
        if line.startswith("--") and not line.lstrip().startswith("--hash"):
            pytest.fail(f"{path.name}: option line {line!r} (a machine's index or find-links)")
    return found


LOCK = pins(ROOT / "requirements.lock")
DEV_LOCK = pins(ROOT / "requirements-dev.lock")
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


@pytest.mark.parametrize("lock", [LOCK, DEV_LOCK], ids=["runtime", "dev"])
def test_every_pin_has_hashes(lock: dict[str, tuple[str, list[str]]]) -> None:
    assert len(lock) > 20
    assert [name for name, (_, hashes) in lock.items() if not hashes] == []


@pytest.mark.parametrize(
    ("requirements", "lock"),
    [
        (PROJECT["dependencies"], LOCK),
        (PROJECT["dependencies"] + PROJECT["optional-dependencies"]["dev"], DEV_LOCK),
    ],
    ids=["runtime", "dev"],
)
def test_the_lock_satisfies_pyproject(requirements: list[str], lock: dict) -> None:
    """A dependency added to or changed in pyproject.toml without `bash .ci/lock` fails here."""
    wrong = []
    for text in requirements:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        if name not in lock:
            wrong.append(f"{name} not in the lock")
        elif not requirement.specifier.contains(lock[name][0], prereleases=True):
            wrong.append(f"{name}=={lock[name][0]} outside {requirement.specifier}")
    assert wrong == [], "refresh the locks: bash .ci/lock"


def test_the_dev_lock_pins_what_the_images_run_at_the_same_versions() -> None:
    assert {name: LOCK[name][0] for name in LOCK} == {name: DEV_LOCK[name][0] for name in LOCK}
    assert {name: LOCK[name][1] for name in LOCK} == {name: DEV_LOCK[name][1] for name in LOCK}


def test_the_tests_run_with_the_locked_torch() -> None:
    for name in ("torch", "torchvision", "torchattacks"):
        assert metadata.version(name).split("+")[0] == LOCK[name][0], name


def labels(path: Path) -> dict[str, str]:
    text = path.read_text()
    if path.name == "Dockerfile":
        block = re.search(r"^LABEL (.*?)(?<!\\)\n", text, flags=re.MULTILINE | re.DOTALL)
        assert block, "no LABEL in the Dockerfile"
        return dict(re.findall(r'([\w.-]+)="([^"]*)"', block.group(1)))
    section = text.split("%labels\n", 1)[1].split("\n%", 1)[0]
    return dict(line.split(None, 1) for line in section.strip().splitlines())


@pytest.mark.parametrize("image", ["Dockerfile", "Apptainer.def"])
def test_image_labels_name_the_locked_versions(image: str) -> None:
    found = labels(ROOT / image)
    lock_python = re.search(
        r"with Python (\d+\.\d+)", (ROOT / "requirements.lock").read_text()
    ).group(1)
    assert found["io.samat.lock"] == "requirements.lock"
    assert found["io.samat.python"] == lock_python
    assert found["org.opencontainers.image.version"] == samat.__version__
    versioned = {k.removeprefix("io.samat."): v for k, v in found.items()}
    for name in ("torch", "torchvision", "torchattacks"):
        assert versioned[name] == LOCK[name][0], name


def test_images_and_ci_install_from_the_lock_with_hashes() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY requirements.lock ./" in dockerfile
    assert "pip install --no-cache-dir --require-hashes -r requirements.lock" in dockerfile
    assert "pip install --no-cache-dir --no-deps ." in dockerfile
    definition = (ROOT / "Apptainer.def").read_text()
    assert "requirements.lock /opt/samat/" in definition
    assert "--require-hashes \\\n        -r /opt/samat/requirements.lock" in definition
    assert "--no-deps /opt/samat" in definition
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    for command in (
        "pip install -r requirements.lock && pip install --no-deps -e .",
        "pip install -r requirements-dev.lock && pip install --no-deps -e . && python -m pytest",
    ):
        assert command in ci and command in readme


def test_every_result_records_the_versions_it_ran_with(tmp_path: Path) -> None:
    from samat.config import validate_run
    from samat.grid import RunSpec, method_label, run_id
    from samat.store import prepare
    from samat.train import execute

    data = {**TINY_BASE, "train": {**TINY_BASE["train"], "epochs": 1}}
    data["eval"] = {**TINY_BASE["eval"], "attacks": []}
    config = validate_run(data)
    rid = run_id(config)
    run = prepare(RunSpec(rid, config, method_label(config), tmp_path / rid))
    recorded = execute(run.path)["versions"]
    assert recorded["torch"] == LOCK["torch"][0]
    assert recorded["torch_build"].split("+")[0] == LOCK["torch"][0]  # e.g. 2.14.1+cu130
    for name in samat.RECORDED_PACKAGES:
        assert recorded[name] == metadata.version(name), name
    assert recorded["samat"] == samat.__version__
    assert run.result()["versions"] == recorded
