"""Property: every malformed grid (and run config in its `base`) is one line and exit status 2
through the CLI, with no traceback, nothing created on disk and nothing submitted.

Hypothesis takes a valid tiny grid and breaks it in one of many ways: unknown keys, wrong types,
numbers out of range, control characters in what reaches the sbatch script or a command line,
bad fractions, grids that expand to nothing, unknown names, YAML that is not a mapping.
"""

from __future__ import annotations

import copy
import itertools
import string
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from samat.cli import cli
from tests.conftest import TINY_BASE

LETTERS = string.ascii_letters
# the C0 controls and DEL; yaml.safe_dump escapes them in double-quoted scalars
CONTROLS = [chr(c) for c in range(32)] + ["\x7f"]
PRINTABLE = string.ascii_letters + string.digits + " -_./:=,'\"$`\\"


def valid_grid() -> dict[str, Any]:
    base = copy.deepcopy(TINY_BASE)
    return {
        "name": "fuzz",
        "base": base,
        "seeds": [0],
        "slurm": {"gpus_per_node": 0, "cpus_per_task": 1},
        "container": {"runtime": "none"},
    }


def set_path(data: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


# -- the ways to break a grid ---------------------------------------------------------------------

unknown_names = st.text(LETTERS, min_size=1, max_size=8).map(lambda s: f"x_{s}")
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.text(LETTERS, max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(unknown_names, inner, max_size=2),
    max_leaves=5,
)
SECTIONS = [
    "",
    "base",
    "base.data",
    "base.model",
    "base.train",
    "base.train.optimizer",
    "base.train.schedule",
    "base.eval",
    "slurm",
    "container",
]


@st.composite
def unknown_key(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    grid = valid_grid()
    section = draw(st.sampled_from(SECTIONS))
    key = draw(unknown_names)
    set_path(grid, f"{section}.{key}" if section else key, draw(json_values))
    return "unknown key", grid


not_a_number = st.one_of(
    st.text(LETTERS, min_size=1, max_size=6).map(lambda s: f"x{s}"),
    st.lists(st.integers(1, 3), min_size=1, max_size=2),
    st.dictionaries(unknown_names, st.integers(), min_size=1, max_size=1),
    st.floats(0.1, 0.9).map(lambda f: 3 + f),  # a fraction where a whole number goes
)
INT_FIELDS = [
    "slurm.cpus_per_task",
    "slurm.timeout_min",
    "slurm.gpus_per_node",
    "slurm.array_parallelism",
    "slurm.max_num_timeout",
    "slurm.signal_delay_s",
    "base.train.epochs",
    "base.train.batch_size",
    "base.eval.n_examples",
    "base.eval.batch_size",
    "base.data.train_size",
    "base.model.width",
]


@st.composite
def wrong_type(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    grid = valid_grid()
    kind = draw(st.sampled_from(["int", "section", "seeds", "string"]))
    if kind == "int":
        set_path(grid, draw(st.sampled_from(INT_FIELDS)), draw(not_a_number))
    elif kind == "section":
        key, value = draw(
            st.sampled_from(
                [
                    ("slurm", "gpu"),
                    ("container", [1]),
                    ("base", 5),
                    ("sweep", "model.name"),
                    ("variants", {"method.name": "sam"}),
                    ("include", "x"),
                    ("seeds", "0"),
                    ("base.train", [1, 2]),
                    ("base.eval.attacks", {"attack": "fgsm"}),
                ]
            )
        )
        set_path(grid, key, value)
    elif kind == "seeds":
        grid["seeds"] = [0, draw(not_a_number)]
    else:
        path = draw(
            st.sampled_from(["slurm.partition", "container.image", "name", "base.model.name"])
        )
        set_path(grid, path, draw(st.integers(-3, 3) | st.lists(st.integers(), min_size=1)))
    return "wrong type", grid


NEGATIVE = [
    ("slurm.cpus_per_task", st.integers(-100, 0)),
    ("slurm.gpus_per_node", st.integers(-100, -1)),
    ("slurm.timeout_min", st.integers(-100, 0)),
    ("slurm.array_parallelism", st.integers(-100, 0)),
    ("slurm.mem_gb", st.floats(-100, 0)),
    ("slurm.max_num_timeout", st.integers(-100, -1)),
    ("slurm.signal_delay_s", st.integers(-100, 0)),
    ("base.train.epochs", st.integers(-100, 0)),
    ("base.train.batch_size", st.integers(-100, 0)),
    ("base.train.optimizer.lr", st.floats(-10, 0)),
    ("base.train.optimizer.momentum", st.floats(-10, -0.01) | st.floats(1, 10)),
    ("base.train.optimizer.weight_decay", st.floats(-10, -1e-6)),
    ("base.eval.n_examples", st.integers(-100, 0)),
    ("base.data.test_size", st.integers(-100, 0)),
    ("base.train.schedule.milestones", st.lists(st.floats(-2, 0) | st.floats(1.01, 5), min_size=1)),
]


@st.composite
def out_of_range(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    grid = valid_grid()
    path, values = draw(st.sampled_from(NEGATIVE))
    set_path(grid, path, draw(values))
    return "out of range", grid


def with_control(draw: st.DrawFn) -> str:
    before = draw(st.text(PRINTABLE, max_size=6))
    after = draw(st.text(PRINTABLE, max_size=6))
    return before + draw(st.sampled_from(CONTROLS)) + after


PLAIN_FIELDS = [
    "slurm.partition",
    "slurm.account",
    "slurm.qos",
    "slurm.constraint",
    "slurm.setup",
    "slurm.additional_parameters.key",
    "slurm.additional_parameters.value",
    "container.image",
    "container.binds",
    "container.env.key",
    "container.env.value",
    "container.executable",
    "container.python",
    "name",
    "output",
]


@st.composite
def control_character(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    grid = valid_grid()
    field = draw(st.sampled_from(PLAIN_FIELDS))
    text = with_control(draw)
    section = field.split(".")[0]
    if section == "container":
        grid["container"] = {
            "runtime": draw(st.sampled_from(["docker", "apptainer"])),
            "image": "i",
        }
    if field == "slurm.setup":
        grid["slurm"]["setup"] = ["module load cuda", text]
    elif field.endswith(".key"):
        set_path(grid, field.rsplit(".", 1)[0], {text: "x"})
    elif field.endswith(".value"):
        set_path(grid, field.rsplit(".", 1)[0], {"NAME": text})
    elif field == "container.binds":
        grid["container"]["binds"] = [f"/{text}:/data"]
    else:
        set_path(grid, field, text)
    return "control character", grid


BAD_FRACTIONS = st.one_of(
    st.integers(0, 300).map(lambda n: f"{n}/0"),
    st.text(LETTERS, min_size=1, max_size=3).map(lambda s: f"{s}/255"),
    st.sampled_from(
        ["8//255", "1/2/3", "/", "8/", "/255", "", "-8/255", "8/-0", "8/2x", "8 255", "1 / 2 / 3"]
    ),
)


@st.composite
def bad_fraction(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    grid = valid_grid()
    bad = draw(BAD_FRACTIONS)
    where = draw(st.sampled_from(["method", "attack", "sweep", "variant"]))
    if where == "method":
        grid["base"]["method"] = {"name": "pgd_at", "eps": bad, "steps": 1}
    elif where == "attack":
        grid["base"]["eval"]["attacks"] = [{"attack": "pgd", "eps": bad, "steps": 1}]
    elif where == "sweep":
        grid["base"]["method"] = {"name": "sam"}
        grid["sweep"] = {"method.rho": [0.1, bad]}
    else:
        grid["variants"] = [{"method.name": "fgsm_at", "method.eps": [bad]}]
    return "bad fraction", grid


@st.composite
def expands_to_nothing(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    grid = valid_grid()
    kind = draw(st.sampled_from(["seeds", "variant", "sweep", "exclude"]))
    if kind == "seeds":
        grid["seeds"] = []
    elif kind == "variant":
        count = draw(st.integers(1, 3))
        grid["variants"] = [{"method.name": "sam", "method.rho": []}] * count
    elif kind == "sweep":
        grid["sweep"] = {draw(st.sampled_from(["model.name", "train.epochs", "seed"])): []}
    else:
        grid["seeds"] = draw(st.lists(st.integers(0, 5), min_size=1, max_size=3, unique=True))
        grid["exclude"] = [{"model.name": "small_cnn"}]
    return "empty", grid


@st.composite
def unknown_name(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    grid = valid_grid()
    name = draw(unknown_names)
    path = draw(
        st.sampled_from(
            [
                "base.method",
                "base.model.name",
                "base.data.name",
                "base.train.optimizer.name",
                "base.train.schedule.name",
                "base.eval.attacks",
                "container.runtime",
            ]
        )
    )
    if path == "base.method":
        set_path(grid, path, {"name": name})
    elif path == "base.eval.attacks":
        set_path(grid, path, [draw(st.sampled_from([name, {"attack": name}]))])
    else:
        set_path(grid, path, name)
    return "unknown name", grid


@st.composite
def not_a_grid(draw: st.DrawFn) -> tuple[str, Any]:
    return "not a mapping", draw(
        st.sampled_from(
            [
                [1, 2],
                "name: [unclosed",  # YAML syntax (written as text, see below)
                42,
                None,
                {"base": {}},  # no name
                {"name": None},
            ]
        )
    )


MALFORMED = st.one_of(
    unknown_key(),
    wrong_type(),
    out_of_range(),
    control_character(),
    bad_fraction(),
    expands_to_nothing(),
    unknown_name(),
    not_a_grid(),
)


# -- the property ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


COUNTER = itertools.count()


def write_case(workdir: Path, case: Any) -> tuple[Path, Path]:
    """The grid file, with its output set to a directory of its own (unless the case is about
    `output` itself, or is not a mapping); the output directory that must not appear."""
    number = next(COUNTER)
    output = workdir / f"out-{number}"
    grid_file = workdir / f"grid-{number}.yaml"
    if case == "name: [unclosed":
        grid_file.write_text(case + "\n")
        return grid_file, output
    if isinstance(case, dict):
        case = copy.deepcopy(case)
        if isinstance(case.get("output"), str):  # a control character in the output path
            output = workdir / case["output"]
            case["output"] = str(output)
        elif "name" in case or "base" in case:
            case["output"] = str(output)
    text = yaml.safe_dump(case, sort_keys=False)
    assert yaml.safe_load(text) == case  # the YAML says exactly what was drawn
    grid_file.write_text(text)
    return grid_file, output


def must_not_launch(*args: Any, **kwargs: Any) -> int:
    raise AssertionError("a malformed grid reached the launcher")


@settings(
    max_examples=200,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=MALFORMED)
def test_malformed_grids_are_one_line_and_exit_status_2(
    workdir: Path, case: tuple[str, Any]
) -> None:
    kind, data = case
    event(kind)
    grid_file, output = write_case(workdir, data)
    runner = CliRunner()
    with (
        mock.patch("samat.launch.submit._launch", must_not_launch),
        mock.patch("samat.launch.submit.prepare", must_not_launch),
    ):
        for args in (["plan", str(grid_file)], ["submit", str(grid_file), "--executor", "local"]):
            result = runner.invoke(cli, args)
            lines = result.output.strip().splitlines()
            context = f"{kind}: samat {args[0]} -> {result.output!r}"
            assert result.exit_code == 2, context
            assert len(lines) == 1 and lines[0].startswith("error: "), context
            assert isinstance(result.exception, SystemExit), context
            assert "Traceback" not in result.output, context
            assert not output.exists(), context
