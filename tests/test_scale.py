"""Many runs: what keeps `samat status`, `collect`, `--help` and a submit's bookkeeping fast must
not change what they show or write. (The timings themselves: `python -m benchmarks --sections
scale`.)"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from rich.console import Console
from rich.table import Table
from rich.text import Text

from benchmarks.scale import submit_specs, write_results
from samat import report, store
from samat.cli import cli
from samat.config import ConfigError
from samat.grid import group_id, method_label
from samat.launch.status import PlainTable, RunStatus, plain_table_lines, status_table
from samat.launch.submit import Action, prepare_runs, record_submission, replay_submissions
from samat.store import RunDir, RunReader, find_runs, prepare, training_yaml

ROOT = Path(__file__).resolve().parents[1]

# never loaded by `import samat.cli` (so by `samat --help` and every other command)
HEAVY = ("torch", "scipy", "numpy", "pydantic", "yaml", "submitit")


def _loaded(code: str, *args: str) -> list[str]:
    """The HEAVY modules a fresh interpreter has loaded after running `code`."""
    probe = f"{code}\nimport sys\nprint(sorted({{m.split('.')[0] for m in sys.modules}}))\n"
    done = subprocess.run(
        [sys.executable, "-c", probe, *args], capture_output=True, text=True, check=True
    )
    loaded = eval(done.stdout.strip().splitlines()[-1])
    return [name for name in HEAVY if name in loaded]


def test_importing_the_cli_loads_no_heavy_module():
    assert _loaded("import samat.cli") == []


def test_help_loads_no_heavy_module_and_lists_every_command():
    code = (
        "import sys\n"
        "from samat.cli import cli\n"
        "try:\n"
        "    cli(['--help'], prog_name='samat')\n"
        "except SystemExit as stop:\n"
        "    assert stop.code == 0\n"
    )
    assert _loaded(code) == []
    result = CliRunner().invoke(cli, ["--help"])
    listed = [line.split()[0] for line in result.output.split("Commands:")[1].splitlines() if line]
    assert {"data", "theory", "status", "collect", "submit"} <= set(listed)
    # the lazy commands still run
    assert CliRunner().invoke(cli, ["data", "--help"]).exit_code == 0


def test_a_dry_run_checks_the_grid_without_torch(tmp_path):
    """submit --dry-run validates (model names included) and prints, importing no torch."""
    grid = ROOT / "configs" / "demo.yaml"
    code = (
        "import sys\n"
        "from samat.cli import cli\n"
        "try:\n"
        "    cli(['submit', sys.argv[1], '--dry-run', '--executor', 'local'], prog_name='samat')\n"
        "except SystemExit as stop:\n"
        "    assert stop.code == 0\n"
    )
    assert "torch" not in _loaded(code, str(grid))
    bad = tmp_path / "grid.yaml"
    bad.write_text(grid.read_text().replace("small_cnn", "resnet9"))
    result = CliRunner().invoke(cli, ["submit", str(bad), "--dry-run", "--executor", "local"])
    assert result.exit_code == 2 and "unknown model 'resnet9' (model.name)" in result.output


def test_status_and_collect_load_neither_torch_nor_scipy(tmp_path):
    write_results(tmp_path, 3)
    code = (
        "import sys\n"
        "from samat.cli import cli\n"
        "for args in (['status', sys.argv[1]], ['collect', sys.argv[1], '--format', 'json']):\n"
        "    try:\n"
        "        cli(args, prog_name='samat')\n"
        "    except SystemExit as stop:\n"
        "        assert stop.code == 0, args\n"
    )
    loaded = _loaded(code, str(tmp_path))
    assert "torch" not in loaded and "scipy" not in loaded
    # status alone reads the seed from config.yaml's last line: no YAML parsing, no validation
    status_only = code.replace(", ['collect', sys.argv[1], '--format', 'json']", ",")
    assert _loaded(status_only, str(tmp_path)) == ["yaml"]


# -- one pass over the runs gives what RunDir gives --------------------------------------------


def _expected_statuses(runs: list[RunDir]) -> list[tuple[str, str, str, str]]:
    """(run id, label, seed, state) of each run as RunDir's own readers give them (no scheduler:
    the runs here have no job ids). The seed is config.yaml's last line when that is a seed line
    as samat writes it (status parses no YAML for it), else the config's, else '-'."""
    rows = []
    for run in runs:
        state = run.state()
        last = (
            run.file("config.yaml").read_text().splitlines()[-1:]
            if run.file("config.yaml").exists()
            else []
        )
        try:
            seed = str(run.config().seed)
        except ConfigError:
            seed = "-"
        if last and re.fullmatch(r"seed: -?\d+", last[0]):
            seed = last[0].split()[1]
        name = "done" if run.is_complete() else state.state
        if state.state == "done" and not run.is_complete():
            name = "pending"  # done, and its result is gone: submit again
        rows.append((run.run_id, state.label or "-", seed, name))
    return rows


def _statuses(root: Path) -> list[tuple[str, str, str, str]]:
    result = CliRunner().invoke(cli, ["status", str(root), "--json"])
    assert result.exit_code in (0, 1), result.output
    rows = json.loads(result.output)
    return [
        (r["run_id"], r["label"], "-" if r["seed"] is None else str(r["seed"]), r["state"])
        for r in rows
    ]


def _damage(runs: list[RunDir]) -> None:
    """One run per way a config can be read: flow style, bad YAML, an unknown key, an old layout,
    a bad evaluation request, a seed that is not an int, a missing config."""
    flow = runs[0].training_config()
    runs[0].file("config.yaml").write_text(yaml.safe_dump(flow, default_flow_style=True))
    runs[1].file("config.yaml").write_text("data: [unclosed\nseed: 3\n")
    text = runs[2].file("config.yaml").read_text()
    runs[2].file("config.yaml").write_text(text.replace("model:", "modle:"))
    runs[3].file("config.yaml").write_text(text + "eval: {}\n")
    runs[4].file("eval.json").write_text('{"attacks": 3}')
    runs[5].file("config.yaml").write_text(text.replace("\nseed: ", "\nseed: '") + "'\n")
    runs[6].file("config.yaml").write_text(text.replace("seed: ", "seed: 0x1"))


def test_status_shows_what_the_run_directories_say(tmp_path):
    write_results(tmp_path, 12)
    runs = find_runs(tmp_path)
    _damage(runs)
    store.write_json(runs[8].file("state.json"), {**runs[8].state().to_json(), "state": "failed"})
    runs[9].file("result.json").unlink()
    assert _statuses(tmp_path) == _expected_statuses(runs)
    seeds = [row[2] for row in _statuses(tmp_path)]
    assert len(set(seeds)) > 3  # the runs that share a config keep their own seeds


def test_a_run_changed_after_a_read_shows_its_new_state_and_result(tmp_path):
    write_results(tmp_path, 4)
    runs = find_runs(tmp_path)
    before = _statuses(tmp_path)
    assert {row[3] for row in before} == {"done"}
    runs[0].file("result.json").unlink()
    store.write_json(runs[1].file("state.json"), {**runs[1].state().to_json(), "label": "new"})
    result = json.loads(runs[2].file("result.json").read_text())
    store.write_json(runs[2].file("result.json"), {**result, "natural": 0.125})
    text = runs[3].file("config.yaml").read_text()
    runs[3].file("config.yaml").write_text(text.replace("\nseed: 0", "\nseed: 77"))
    after = _statuses(tmp_path)
    assert after == _expected_statuses(runs)
    assert after[0][3] == "pending" and after[1][1] == "new" and after[3][2] == "77"
    rows = json.loads(
        CliRunner().invoke(cli, ["collect", str(tmp_path), "--per-run", "--format", "json"]).output
    )
    assert {r["run_id"]: r["natural"] for r in rows}[runs[2].run_id] == 0.125
    assert {r["run_id"]: r["seed"] for r in rows}[runs[3].run_id] == 77


def test_collect_records_are_what_the_run_directories_say(tmp_path):
    write_results(tmp_path, 15)
    runs = find_runs(tmp_path)
    runs[2].file("result.json").unlink()
    records = report.load_records(tmp_path)
    for record, run in zip(records, runs, strict=True):
        config = run.config()
        assert record.run.path == run.path
        assert record.seed == config.seed
        assert record.config == config.model_dump(mode="json")
        assert record.group == group_id(config)
        assert record.label == (run.state().label or method_label(config))
        assert record.result == run.result()
        assert record.state == ("done" if run.result() else run.state().state)
    assert len({r.group for r in records}) == 5 and len({r.seed for r in records}) == 3


def test_the_reader_gives_runDir_s_config_or_its_error(tmp_path):
    write_results(tmp_path, 20)
    runs = find_runs(tmp_path)
    _damage(runs)
    runs[7].file("config.yaml").unlink()
    reader = RunReader()
    for run in runs:
        view = reader.read(run)
        assert view.state == run.state() and view.result == run.result()
        assert view.request_key == run.request_key()
        assert view.is_complete() == run.is_complete()
        try:
            expected = run.config()
        except ConfigError as error:
            with pytest.raises(ConfigError) as raised:
                reader.config(view)
            assert str(raised.value) == str(error)
        else:
            assert reader.config(view) == expected
            assert reader.shared_config(view)[1] == expected.seed


def test_find_runs_finds_what_a_glob_finds(tmp_path):
    runs = tmp_path / "runs"
    for name in ("b", "a", ".hidden", "no-config", "c"):
        (runs / name).mkdir(parents=True)
        if name != "no-config":
            (runs / name / "config.yaml").write_text("seed: 0\n")
    (runs / "file").write_text("")
    (runs / "link").symlink_to(runs / "a")
    (runs / "dangling").mkdir()
    (runs / "dangling" / "config.yaml").symlink_to(tmp_path / "nowhere")
    # what a glob finds, but for links (samat never makes one: docs/security.md)
    expected = [
        RunDir(p.parent)
        for p in sorted(runs.glob("*/config.yaml"))
        if not p.parent.is_symlink() and not p.is_symlink()
    ]
    assert [r.path.name for r in expected] == [".hidden", "a", "b", "c"]
    assert [r.path for r in find_runs(tmp_path)] == [r.path for r in expected]
    # but for a run being made whole, or left half made by a killed submit
    (runs / ".0123456789ab.k2j4h5g6.tmp").mkdir()
    (runs / ".0123456789ab.k2j4h5g6.tmp" / "config.yaml").write_text("seed: 0\n")
    assert [r.path for r in find_runs(tmp_path)] == [r.path for r in expected]
    assert [r.path for r in find_runs(runs / "a")] == [runs / "a"]
    assert find_runs(tmp_path / "missing") == []


# -- the status table: rich's output, without rich's per-cell cost -----------------------------


def _rows(count: int, rng: random.Random) -> list[RunStatus]:
    labels = ["SGD", "SAM rho=0.1", "PGD-AT linf eps=8/255 with a long label", "ρ=0.05", "a [b]"]
    notes = ["", "", "no live job; submit again to resume", "loss became nan " * 4, "x:y"]
    return [
        RunStatus(
            f"{rng.getrandbits(48):012x}",
            rng.choice(labels),
            rng.choice([str(i), "-"]),
            rng.choice(["done", "running", "failed", "pending"]),
            rng.randint(0, 12),
            rng.randint(0, 2),
            rng.choice(["-", "42_1", "1234567_1000", "[x]"]),
            rng.choice(["-", "01:05:00", "100:00:00"]),
            rng.choice(notes) if i % 2 else "",
            True,
        )
        for i in range(count)
    ]


@pytest.mark.parametrize("width", [30, 60, 80, 120, 250])
def test_the_plain_status_table_is_rich_s_own(width):
    rng = random.Random(width)
    for count in (0, 1, 3, 40):
        rows = _rows(count, rng)
        expected, fast = io.StringIO(), io.StringIO()
        Console(file=expected, width=width).print(status_table(rows, "/results/grid"))
        Console(file=fast, width=width).print(PlainTable(status_table(rows, "/results/grid")))
        assert fast.getvalue() == expected.getvalue()


def test_the_plain_table_takes_the_status_table_and_leaves_the_rest_to_rich():
    console = Console(file=io.StringIO(), width=100)
    rows = _rows(20, random.Random(0))
    assert plain_table_lines(status_table(rows, "t"), console, console.options) is not None
    styled = Table(row_styles=["dim", ""])
    styled.add_column("a")
    styled.add_row(Text("x"))
    assert plain_table_lines(styled, console, console.options) is None
    out = io.StringIO()
    Console(file=out, width=100, force_terminal=True, color_system="truecolor").print(
        PlainTable(status_table(rows, "t"))
    )
    assert "\x1b[" in out.getvalue()  # colours: rich's own table


# -- a submit's bookkeeping -------------------------------------------------------------------


def test_training_yaml_is_yaml_s_dump_of_the_config(tmp_path):
    for spec in submit_specs(tmp_path, 12):
        data = spec.config.model_dump(mode="json", exclude={"eval"})
        assert data.pop("track") == []  # no trackers: not written, as before they existed
        assert training_yaml(spec.config) == yaml.safe_dump(data, sort_keys=False)


def test_prepare_makes_a_new_run_whole_with_the_usual_files_and_modes(tmp_path, monkeypatch):
    old = os.umask(0o002)
    try:
        spec = submit_specs(tmp_path, 1)[0]
        run = prepare(spec, sync=False, state="pending", job_id=None)
    finally:
        os.umask(old)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [spec.run_id]
    assert sorted(p.name for p in run.path.iterdir()) == ["config.yaml", "eval.json", "state.json"]
    assert run.path.stat().st_mode & 0o777 == 0o775
    # files readable by the group, never writable by it, whatever the umask (docs/security.md)
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in run.path.iterdir())
    assert run.config() == spec.config
    assert run.state().label == spec.label and run.state().state == "pending"
    assert run.file("eval.json").read_text() == (
        json.dumps(spec.config.eval.model_dump(mode="json"), indent=2) + "\n"
    )
    # an existing run is kept: its state and records stay, its label follows the grid
    store.write_json(run.file("state.json"), {**run.state().to_json(), "trained": True})
    again = prepare(dataclasses.replace(spec, label="new"), sync=False)
    assert again.state().trained and again.state().label == "new"


def test_a_submit_pass_writes_every_run_without_an_fsync_per_file(tmp_path, monkeypatch):
    specs = submit_specs(tmp_path, 20)
    fsyncs, flushes = [], []
    monkeypatch.setattr(os, "fsync", lambda fd: fsyncs.append(fd))
    monkeypatch.setattr(store, "_syncfs", lambda fd: flushes.append(fd) or 0)
    actions = {spec.run_id: Action("train") for spec in specs}
    actions[specs[0].run_id] = Action("done")
    prepare_runs(specs, actions, force=False)
    assert fsyncs == [] and len(flushes) == 1
    for spec in specs:
        run = RunDir(spec.run_dir)
        assert run.config() == spec.config
        assert run.state().label == spec.label and run.state().state == "pending"
    # a second pass over existing runs: nothing rewritten but the states of the runs that run
    before = {s.run_id: RunDir(s.run_dir).file("config.yaml").stat().st_mtime_ns for s in specs}
    prepare_runs(specs, actions, force=False)
    after = {s.run_id: RunDir(s.run_dir).file("config.yaml").stat().st_mtime_ns for s in specs}
    assert before == after and fsyncs == [] and len(flushes) == 2


def test_a_slurm_submit_writes_a_new_run_s_state_once_with_its_job_id(tmp_path, monkeypatch):
    specs = submit_specs(tmp_path, 12)
    actions = {spec.run_id: Action("train") for spec in specs}
    prepare_runs(specs, actions, force=False, defer=True)
    assert all(not RunDir(s.run_dir).file("state.json").exists() for s in specs)
    assert len(find_runs(tmp_path)) == 12  # config.yaml and eval.json are there
    fsyncs = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: fsyncs.append(fd) or real_fsync(fd))
    jobs = [f"77_{i}" for i in range(len(specs))]
    record_submission(tmp_path, "grid", "77", specs, jobs)
    assert len(fsyncs) <= 2  # the journal (and its folder when new), not each state.json
    for spec, job in zip(specs, jobs, strict=True):
        state = RunDir(spec.run_dir).state()
        assert (state.state, state.job_id, state.label) == ("pending", job, spec.label)
    assert not [p for p in (tmp_path / "runs").rglob(".*") if p.name.endswith(".tmp")]


def test_a_new_run_left_without_state_by_a_stopped_submit_gets_its_job_id_back(tmp_path):
    specs = submit_specs(tmp_path, 3)
    prepare_runs(specs, {s.run_id: Action("train") for s in specs}, force=False, defer=True)
    # sbatch queued the array and the journal has it; the submit stopped before the states
    entry = {"time": 1.0, "grid": "g", "array": "5", "runs": [s.run_id for s in specs]}
    entry["jobs"] = ["5_0", "5_1", "5_2"]
    (tmp_path / "submissions.jsonl").write_text(json.dumps(entry) + "\n")
    assert replay_submissions(tmp_path, specs) == 3
    assert [RunDir(s.run_dir).state().job_id for s in specs] == ["5_0", "5_1", "5_2"]


def test_wait_asks_the_scheduler_less_and_less_often_and_says_so(tmp_path, monkeypatch):
    from samat.launch import status
    from samat.launch.scheduler import JobInfo

    write_results(tmp_path, 1)
    run = find_runs(tmp_path)[0]
    running = {**run.state().to_json(), "job_id": "42_0", "state": "running"}
    store.write_json(run.file("state.json"), running)
    answers = iter([*["RUNNING"] * 8, "COMPLETED"])
    monkeypatch.setattr(status, "job_states", lambda ids: {"42_0": JobInfo(next(answers))})
    waits: list[float] = []
    monkeypatch.setattr(status.time, "sleep", waits.append)
    out = io.StringIO()
    assert status.follow([run], console=Console(file=out, width=120)) == 0
    assert waits == [3, 6, 12, 24, 48, 60, 60, 60]
    first = out.getvalue().splitlines()[0]
    assert first == (
        "following 1 run: the scheduler is asked after 3 s, then at doubling intervals, "
        "at most every 60 s"
    )
    assert out.getvalue().splitlines()[-1] == "1 run: 1 done"
