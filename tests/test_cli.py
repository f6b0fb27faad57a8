import copy
import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from samat.cli import cli
from tests.conftest import TINY_BASE


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def tiny_grid(tmp_path, **changes):
    grid = {
        "name": "t",
        "output": str(tmp_path / "out"),
        "base": copy.deepcopy(TINY_BASE),
        "variants": [{"method.name": "standard"}, {"method.name": "sam", "method.rho": 0.1}],
        "seeds": [0],
    }
    for key, value in changes.items():
        node = grid
        *parents, last = key.split("/")
        for part in parents:
            node = node[part]
        node[last] = value
    return grid


BAD_INPUTS = {
    "unknown key": ({"base/train/epochz": 3}, "unknown key 'train.epochz'"),
    "wrong type": ({"base/train/epochs": "three"}, "train.epochs"),
    "negative eps": ({"variants": [{"method.name": "pgd_at", "method.eps": -0.1}]}, "method.eps"),
    "missing data root": (
        {"base/data": {"name": "cifar10", "root": "/nonexistent/cifar"}},
        "data.root /nonexistent/cifar does not exist",
    ),
    "unknown model": ({"base/model/name": "resnet9000"}, "unknown model 'resnet9000'"),
    "unknown attack": (
        {"base/eval/attacks": [{"attack": "carlini", "eps": 0.1}]},
        "eval.attacks.0",
    ),
    "unknown preset": ({"base/eval/attacks": ["pgd_9000"]}, "pgd_9000"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
@pytest.mark.parametrize("command", ["plan", "submit"])
def test_bad_grid_is_one_line_exit_2_and_nothing_runs(tmp_path, write_yaml, case, command):
    change, needle = BAD_INPUTS[case]
    if (command, case) == ("plan", "missing data root"):
        pytest.skip("plan lists a grid whose data is not staged here: see the test below")
    path = write_yaml(tiny_grid(tmp_path, **change))
    result = invoke(command, path, *(["--executor", "local"] if command == "submit" else []))
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert needle in lines[0]
    assert not (tmp_path / "out").exists()


def test_plan_lists_a_grid_whose_data_root_is_missing_with_a_warning(tmp_path, write_yaml):
    change, needle = BAD_INPUTS["missing data root"]
    path = write_yaml(tiny_grid(tmp_path, **change))
    result = invoke("plan", path)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("warning: ") and needle in result.output.splitlines()[0]
    assert "2 runs to run" in result.output and "train + eval" in result.output
    assert not (tmp_path / "out").exists()


def test_no_traceback_for_user_errors(tmp_path, write_yaml):
    path = write_yaml(tiny_grid(tmp_path, **{"base/train/epochz": 3}))
    proc = subprocess.run(
        [sys.executable, "-m", "samat", "plan", str(path)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert proc.stderr.count("\n") == 1


def test_plan_lists_runs_and_submits_nothing(tmp_path, write_yaml):
    result = invoke("plan", write_yaml(tiny_grid(tmp_path)))
    assert result.exit_code == 0, result.output
    assert "2 runs" in result.output and "SAM rho=0.1" in result.output
    assert not (tmp_path / "out").exists()


def test_run_a_config_file_then_corrupt_checkpoint(tmp_path, write_yaml):
    config = copy.deepcopy(TINY_BASE)
    config["train"]["epochs"] = 1
    path = write_yaml(config, "run.yaml")
    result = invoke("run", path, "--output", tmp_path / "single")
    assert result.exit_code == 0, result.output
    assert "natural" in result.output
    (run_dir,) = (tmp_path / "single" / "runs").iterdir()
    assert json.loads((run_dir / "result.json").read_text())["natural"] > 0
    (run_dir / "checkpoint.safetensors").write_bytes(b"\x10\x00garbage")
    (run_dir / "result.json").unlink()
    result = invoke("run", run_dir)
    assert result.exit_code == 2
    assert result.output.startswith("error: checkpoint ") and "corrupt" in result.output
    assert "delete it" in result.output


def test_collect_unknown_directory(tmp_path):
    result = invoke("collect", tmp_path / "nothing")
    assert result.exit_code == 2 and "no runs found" in result.output


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and "samat" in result.output


def test_help_and_status_import_neither_torch_nor_scipy():
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from samat.cli import cli\n"
        "result = CliRunner().invoke(cli, ['--help'])\n"
        "assert result.exit_code == 0 and 'theory' in result.output, result.output\n"
        "CliRunner().invoke(cli, ['status', '--help'])\n"
        "print(sorted(m for m in ('torch', 'scipy') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
