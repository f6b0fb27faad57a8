"""Files other people can write (a shared data.root, a grid handed around, `--attack` text): they
never run code and never make samat build without bound (issue 23, items 3, 4 and 9)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from samat import safeyaml
from samat.cli import cli
from samat.config import ConfigError, DataConfig, GridConfig, load_grid
from samat.data import load_dataset
from samat.grid import count_runs, expand
from samat.safepickle import NotACifarBatch, load_cifar_batch
from tests.test_datacheck import make_cifar

# -- CIFAR's pickles ------------------------------------------------------------------------------


class _Payload:
    """What an attacker's pickle does on load: runs a command (here: touches a file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _crafted(path: Path, marker: Path) -> None:
    batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1], b"x": _Payload(marker)}
    path.write_bytes(pickle.dumps(batch, protocol=2))


def test_a_crafted_cifar_pickle_in_data_root_runs_no_code_when_training(tmp_path: Path) -> None:
    base = make_cifar(tmp_path, "cifar10")
    marker = tmp_path / "pwned"
    _crafted(base / "data_batch_3", marker)
    with pytest.raises(ConfigError) as caught:
        load_dataset(DataConfig(name="cifar10", root=tmp_path))
    assert not marker.exists()
    assert str(caught.value) == (
        f"{base / 'data_batch_3'} is not a CIFAR batch: it refers to posix.system, which no "
        "CIFAR batch holds; replace it with the file from the CIFAR archive (samat data check "
        "names every bad file)"
    )
    # the payload is real: plain pickle.load (what samat used) runs it
    pickle.loads((base / "data_batch_3").read_bytes())
    assert marker.exists()


def test_data_check_names_the_crafted_file_and_runs_nothing(tmp_path: Path) -> None:
    base = make_cifar(tmp_path, "cifar100")
    marker = tmp_path / "pwned"
    _crafted(base / "test", marker)
    result = CliRunner().invoke(cli, ["data", "check", "cifar100", str(tmp_path)])
    assert not marker.exists()
    assert result.exit_code != 0
    assert f"{base / 'test'}: not a CIFAR batch: it refers to " in result.output
    assert "posix.system, which no CIFAR batch holds; replace it" in result.output


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_real_cifar_batches_load_in_every_pickle_protocol(tmp_path: Path, protocol: int) -> None:
    """The real files are Python 2 protocol-2 pickles of numpy arrays; numpy 2 writes protocol
    4 and 5 ones through other functions (_reconstruct, _frombuffer): all of them load."""
    data = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    batch = {b"batch_label": b"x", b"data": data, b"labels": [3, 4], b"filenames": [b"a", b"b"]}
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps(batch, protocol=protocol))
    loaded = load_cifar_batch(path)
    assert loaded.keys() == batch.keys() and loaded[b"labels"] == [3, 4]
    assert loaded[b"data"].dtype == np.uint8 and np.array_equal(loaded[b"data"], data)


def test_any_other_global_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps({b"data": [1, 2], b"when": time.struct_time((0,) * 9)}))
    with pytest.raises(NotACifarBatch, match="refers to time.struct_time"):
        load_cifar_batch(path)


# -- YAML -----------------------------------------------------------------------------------------


def alias_bomb(levels: int = 9, fan: int = 9) -> str:
    """Each anchor lists the previous one `fan` times: fan**levels values from ~40*levels bytes."""
    lines = [f"l0: &l0 [{', '.join(['x'] * fan)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * fan)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_in_a_grid_is_refused_at_once_in_one_line(tmp_path: Path) -> None:
    bomb = alias_bomb()
    indented = "".join(f"        {line}\n" for line in bomb.splitlines())
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        "name: bomb\nbase:\n  eval:\n    attacks:\n    - attack: fgsm\n      options:\n" + indented
    )
    assert len(grid.read_bytes()) < 1000
    began = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "samat", "plan", str(grid)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    elapsed = time.monotonic() - began
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, lines
    assert "expands to more than 1,000,000 values" in lines[0] and str(grid) in lines[0]
    assert "Traceback" not in lines[0] and not (tmp_path / "results").exists()
    # refused before anything was built: 9**9 = 387 million values would take minutes and GBs
    assert elapsed < 60


def test_the_bound_counts_aliases_each_time_and_lets_ordinary_anchors_through() -> None:
    # 9**6 = 531,441 values fit under the default bound; 9**7 do not
    assert len(safeyaml.load(alias_bomb(levels=6))["l5"]) == 9
    with pytest.raises(safeyaml.YAMLLimitError, match="line 7: the document expands to more"):
        safeyaml.load(alias_bomb(levels=7))
    with pytest.raises(safeyaml.YAMLLimitError):
        safeyaml.load(alias_bomb(levels=2, fan=4), limit=20)  # 1 + 2 * (1 + 4 + 1 + 4 * 5)
    assert safeyaml.load(alias_bomb(levels=2, fan=4), limit=60)["l1"] == [["x"] * 4] * 4
    # a merge key, the usual use of anchors in a grid
    text = "base: &b {lr: 0.1, wd: 0.0005}\nsam: {<<: *b, rho: 0.05}\n"
    assert safeyaml.load(text)["sam"] == {"lr": 0.1, "wd": 0.0005, "rho": 0.05}


def test_a_recursive_alias_is_refused() -> None:
    with pytest.raises(safeyaml.YAMLLimitError, match="line 1: a recursive alias"):
        safeyaml.load("a: &x [1, *x]\n")


def test_duplicate_keys_are_an_error_naming_both_lines(tmp_path: Path) -> None:
    grid = tmp_path / "grid.yaml"
    grid.write_text("name: d\nseeds: [0]\nbase:\n  train:\n    epochs: 1\n    epochs: 5\n")
    with pytest.raises(ConfigError) as caught:
        load_grid(grid)
    assert str(caught.value) == (
        f"{grid}: line 6: duplicate key 'epochs' (first at line 5); keep one of them"
    )
    # yaml.safe_load would have kept the last one silently
    assert yaml.safe_load(grid.read_text())["base"]["train"]["epochs"] == 5


def test_an_attack_option_bomb_on_the_command_line_is_refused(tmp_path: Path) -> None:
    text = "{attack: fgsm, options: {a: &a [x,x,x,x,x,x,x,x,x,x], " + ", ".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]" for i in range(6)
    )
    text += "}}"
    result = CliRunner().invoke(cli, ["eval", str(tmp_path), "--attack", text])
    assert result.exit_code == 2, result.output
    assert "expands to more than 1,000,000 values" in result.output


# -- the number of runs ---------------------------------------------------------------------------


def test_a_grid_of_ten_million_runs_is_refused_with_its_count(tmp_path: Path) -> None:
    sweep = {"train.optimizer.lr": [0.1 * (i + 1) for i in range(10)]}
    sweep.update({f"method.k{i}": list(range(10)) for i in range(5)})
    grid = GridConfig.model_validate(
        {"name": "big", "sweep": sweep, "seeds": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]}
    )
    assert count_runs(grid) == 10_000_000
    began = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        expand(grid, "big.yaml")
    assert time.monotonic() - began < 10  # counted, not built (building one run takes ~1 ms)
    assert str(caught.value) == (
        "big.yaml: the grid expands to 10,000,000 runs, more than max_runs (10,000); shorten "
        "its sweeps, variants or seeds, or raise max_runs"
    )


def test_max_runs_is_a_setting_and_counts_variants_and_includes() -> None:
    grid = GridConfig.model_validate(
        {
            "name": "g",
            "base": {"data": {"name": "digits"}},
            "sweep": {"train.optimizer.lr": [0.1, 0.2]},
            "variants": [
                {"method.name": "standard"},
                {"method.name": "sam", "method.rho": [0.1, 0.2]},
            ],
            "include": [{"method.name": "sam", "method.rho": 0.5}],
            "seeds": [0, 1],
            "max_runs": 14,
        }
    )
    assert count_runs(grid) == (2 * (1 + 2) + 1) * 2 == 14
    assert len(expand(grid)) == 14
    with pytest.raises(ConfigError, match="expands to 14 runs, more than max_runs \\(13\\)"):
        expand(grid.model_copy(update={"max_runs": 13}))


# -- links and labels (item 1) --------------------------------------------------------------------


def test_a_link_in_place_of_a_runs_log_is_replaced_not_followed(tmp_path: Path) -> None:
    from samat.train import execute
    from tests.test_train import make_run

    run = make_run(tmp_path, train={"epochs": 1})
    victim = tmp_path / "victim.txt"
    victim.write_text("a teammate's file\n")
    log = run.file("log")
    log.unlink(missing_ok=True)
    log.symlink_to(victim)
    execute(run.path)
    assert victim.read_text() == "a teammate's file\n"
    assert not log.is_symlink() and "epoch 1/1" in log.read_text()


def test_a_link_in_place_of_the_journal_or_the_lock_is_replaced(tmp_path: Path, slurm_bin) -> None:
    from samat.launch import submit_grid
    from samat.launch.lock import LOCK_FILE
    from samat.launch.submit import SUBMISSIONS, read_submissions
    from tests.test_launch import make_grid, recording_console
    from tests.test_launch_safety import fake_slurm

    fake_slurm(slurm_bin, tmp_path)
    grid = make_grid(tmp_path, seeds=2)
    output = Path(grid.output)
    output.mkdir()
    victims = {name: tmp_path / f"victim-{name}" for name in (SUBMISSIONS, LOCK_FILE)}
    for name, victim in victims.items():
        victim.write_text("untouched\n")
        (output / name).symlink_to(victim)
    assert submit_grid(grid, executor="slurm", console=recording_console()) == 0
    assert all(victim.read_text() == "untouched\n" for victim in victims.values())
    assert not any((output / name).is_symlink() for name in victims)
    assert read_submissions(output)[0]["array"] == "42"


def test_open_append_never_writes_through_a_link_and_takes_over_a_teammates_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from samat.store import open_append

    target = tmp_path / "target"
    target.write_text("kept\n")
    link = tmp_path / "log"
    link.symlink_to(target)
    with open_append(link) as handle:
        handle.write("mine\n")
    assert target.read_text() == "kept\n" and link.read_text() == "mine\n"
    assert (link.stat().st_mode & 0o022) == 0  # never group- or world-writable
    # a file this user may not write (a teammate's, 0644): replaced by a copy, then appended
    theirs = tmp_path / "theirs"
    theirs.write_text("their line\n")
    theirs.chmod(0o444)
    before = theirs.stat().st_ino
    real_open, refused = os.open, []

    def open_(path, flags, mode=0o777, **kwargs):
        # what a non-root user gets on a file of a teammate's (CI runs as root, which may write)
        if str(path) == str(theirs) and flags & os.O_WRONLY and not refused:
            refused.append(path)
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, mode, **kwargs)

    monkeypatch.setattr(os, "open", open_)
    with open_append(theirs) as handle:
        handle.write("our line\n")
    assert refused and theirs.read_text() == "their line\nour line\n"
    assert theirs.stat().st_ino != before  # a new file of ours, renamed over theirs


@pytest.mark.parametrize(
    "label", ["FGSM\n2026-01-01 INFO run done", "FGSM\r", "a\x1b[31mred", "", "  "]
)
def test_an_attack_label_with_a_control_character_or_empty_is_refused(label: str) -> None:
    from samat.cli import parse_attacks

    with pytest.raises(ConfigError) as caught:
        parse_attacks((yaml.safe_dump({"attack": "fgsm", "label": label}, width=1000),))
    message = str(caught.value)
    assert message.startswith("--attack: eval.attacks.0.label: ") or "label" in message
    assert "\n" not in message


@pytest.mark.parametrize("name", ["../..", "/tmp/x", "", "..", "a/b", " "])
def test_a_path_like_grid_name_is_refused(tmp_path: Path, name: str) -> None:
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"name": name, "base": {"data": {"name": "digits"}}}))
    with pytest.raises(ConfigError) as caught:
        load_grid(grid)
    assert str(caught.value).startswith(f"{grid}: name: ")


@pytest.mark.parametrize("key", ["array", "--array", "signal", "job-name", "J", "output", "time"])
def test_additional_parameters_cannot_override_samats_own_lines(key: str) -> None:
    with pytest.raises(ValueError, match="is a line samat writes itself"):
        GridConfig.model_validate({"name": "g", "slurm": {"additional_parameters": {key: "1"}}})
    ok = GridConfig.model_validate(
        {"name": "g", "slurm": {"additional_parameters": {"mail_type": "END"}}}
    )
    assert ok.slurm.additional_parameters == {"mail_type": "END"}


# -- submitit's folder (item 2) -------------------------------------------------------------------


def test_submitits_folder_and_pickles_are_private_under_a_group_umask(
    tmp_path: Path, slurm_bin
) -> None:
    from samat.launch import submit_grid
    from tests.test_launch import make_grid, recording_console
    from tests.test_launch_safety import fake_slurm

    fake_slurm(slurm_bin, tmp_path)
    grid = make_grid(tmp_path, seeds=2)
    previous = os.umask(0o002)
    try:
        assert submit_grid(grid, executor="slurm", console=recording_console()) == 0
    finally:
        os.umask(previous)
    folder = Path(grid.output) / "submitit"
    assert folder.stat().st_mode & 0o777 == 0o700
    pickles = list(folder.rglob("*.pkl"))
    assert pickles, list(folder.rglob("*"))
    assert {p.stat().st_mode & 0o777 for p in pickles} == {0o600}
    # run files: readable by the group, writable by nobody else, whatever the umask
    state = next(Path(grid.output).glob("runs/*/state.json"))
    assert state.stat().st_mode & 0o777 == 0o644


def test_a_submitit_folder_that_is_a_link_is_refused(tmp_path: Path, slurm_bin) -> None:
    from samat.launch import submit_grid
    from tests.test_launch import make_grid, recording_console
    from tests.test_launch_safety import fake_slurm, sbatch_count

    fake_slurm(slurm_bin, tmp_path)
    grid = make_grid(tmp_path, seeds=1)
    Path(grid.output).mkdir()
    (tmp_path / "elsewhere").mkdir()
    (Path(grid.output) / "submitit").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="submitit is not a folder samat made"):
        submit_grid(grid, executor="slurm", console=recording_console())
    assert sbatch_count(tmp_path) == 0 and not any((tmp_path / "elsewhere").iterdir())


# -- the journal (item 6) -------------------------------------------------------------------------


def test_an_entry_after_a_cut_line_is_its_own_line(tmp_path: Path, slurm_bin) -> None:
    from samat.launch import submit_grid
    from samat.launch.submit import SUBMISSIONS, read_submissions
    from tests.test_launch import make_grid, recording_console
    from tests.test_launch_safety import fake_slurm

    fake_slurm(slurm_bin, tmp_path)
    grid = make_grid(tmp_path, seeds=2)
    output = Path(grid.output)
    output.mkdir()
    journal = output / SUBMISSIONS
    journal.write_text(
        '{"time": 1, "grid": "t", "array": "7", "runs": ["a"], "jobs": ["7_0"]}\n{"ti'
    )
    assert submit_grid(grid, executor="slurm", console=recording_console()) == 0
    entries = read_submissions(output)
    assert [e["array"] for e in entries] == ["7", "42"]
    assert journal.read_text().splitlines()[1] == '{"ti'


# -- labels that look like rich markup (item 9) ---------------------------------------------------


def test_labels_that_look_like_rich_markup_are_shown_as_written(tmp_path: Path) -> None:
    import copy

    from samat.store import prepare
    from tests.conftest import TINY_BASE, finish

    base = copy.deepcopy(TINY_BASE)
    base["eval"]["attacks"] = [
        {"attack": "fgsm", "eps": 0.1, "label": "[/]"},
        {"attack": "fgsm", "eps": 0.2, "label": "[bold]x"},
    ]
    grid = GridConfig(name="m", output=tmp_path / "out", base=base, seeds=[0, 1])
    for spec in expand(grid):
        finish(prepare(spec))
    result = CliRunner().invoke(cli, ["collect", str(tmp_path / "out")])
    assert result.exit_code == 0, repr(result.exception)
    header = next(line for line in result.output.splitlines() if "Natural" in line)
    assert "[/]" in header and "[bold]x" in header
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(grid.model_dump(mode="json")))
    result = CliRunner().invoke(cli, ["plan", str(grid_file)])
    assert result.exit_code == 0, repr(result.exception)
    assert "[/], [bold]x" in result.output


# -- teammates' jobs (item 7) ---------------------------------------------------------------------


def test_a_run_held_by_a_teammates_job_is_not_resubmitted(tmp_path: Path, slurm_bin) -> None:
    """squeue --me and sacct without --allusers leave out a teammate's job: the run it holds
    read as not running and was queued again. The stand-ins answer only for the job asked by
    id, and only sacct --allusers reports it (as SLURM does for another user's job)."""
    from samat.launch import submit_grid
    from samat.store import RunDir, prepare
    from tests.conftest import set_state
    from tests.test_launch import make_grid, recording_console
    from tests.test_launch_safety import fake_slurm, sbatch_count

    fake_slurm(slurm_bin, tmp_path)
    slurm_bin(
        "squeue",
        'case "$*" in *--me*) exit 0 ;; *"-j 77"*) echo "77_0|RUNNING|5:00" ;; esac; exit 0',
    )
    slurm_bin(
        "sacct",
        'case "$*" in *--allusers*) echo "77_0|RUNNING|00:05:00" ;; esac; exit 0',
    )
    grid = make_grid(tmp_path, seeds=2)
    runs = [prepare(spec) for spec in expand(grid)]
    set_state(runs[0], job_id="77_0", state="running")  # a teammate's submit of the shared dir
    console = recording_console()
    assert submit_grid(grid, executor="slurm", console=console) == 0
    assert "1 run to run, 1 skipped (1 running)" in console.export_text()
    assert RunDir(runs[0].path).state().job_id == "77_0" and sbatch_count(tmp_path) == 1


def test_jobs_the_controller_has_forgotten_are_an_answer_not_silence(slurm_bin) -> None:
    from samat.launch import scheduler

    slurm_bin("squeue", 'echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1')
    slurm_bin("sacct", 'echo "5_0|COMPLETED|00:00:09"')
    assert scheduler.job_states(["5_0"], need_controller=True) == {
        "5_0": scheduler.JobInfo("COMPLETED", "00:00:09")
    }
    slurm_bin("squeue", 'echo "squeue: error: Unable to contact slurm controller" >&2; exit 1')
    assert scheduler.job_states(["5_0"], need_controller=True) is None


# -- the journal's intent (item 6) ----------------------------------------------------------------


def intent_slurm(slurm_bin, tmp_path: Path) -> None:
    """fake_slurm, and an squeue that lists each queued array's SLURM comment (%k) as the
    controller does: the comment comes from the script sbatch was given."""
    from tests.test_launch_safety import fake_slurm

    fake_slurm(slurm_bin, tmp_path)
    t = tmp_path
    slurm_bin(
        "squeue",
        f"""case "$*" in
  *'%F|%k'*) for f in {t}/script-*.sh; do [ -e "$f" ] || continue
      n=${{f##*script-}}; n=${{n%.sh}}
      [ -e {t}/gone-$n ] && continue
      echo "$((41 + n))|$(sed -n 's/^#SBATCH --comment=//p' "$f")"; done ;;
  *) cat {t}/queue 2>/dev/null ;;
esac
true""",
    )


def test_a_record_that_fails_after_sbatch_is_one_line_and_nothing_is_queued_twice(
    tmp_path: Path, slurm_bin, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from samat.launch import submit as submit_module
    from samat.launch import submit_grid
    from samat.store import RunDir
    from tests.test_launch import make_grid, recording_console
    from tests.test_launch_safety import sbatch_count

    intent_slurm(slurm_bin, tmp_path)
    grid = make_grid(tmp_path, seeds=3)
    real = submit_module.record_submission

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(submit_module, "record_submission", disk_full)
    with pytest.raises(ConfigError) as caught:
        submit_grid(grid, executor="slurm", console=recording_console())
    assert str(caught.value) == (
        f"SLURM queued job 42 (3 runs), but recording it in {grid.output} failed (No space left "
        "on device); free the disk, then submit again: it finds the job by its recorded intent "
        "and queues nothing twice"
    )
    monkeypatch.setattr(submit_module, "record_submission", real)
    console = recording_console()
    assert submit_grid(grid, executor="slurm", console=console) == 0
    assert "nothing to submit: 0 runs to run, 3 skipped (3 queued)" in console.export_text()
    assert sbatch_count(tmp_path) == 1
    assert [RunDir(s.run_dir).state().job_id for s in expand(grid)] == ["42_0", "42_1", "42_2"]


def test_a_kill_between_sbatch_and_the_record_queues_nothing_twice(
    tmp_path: Path, slurm_bin
) -> None:
    """kill -9 of `samat submit` while sbatch returns: the intent is on disk, the record not."""
    from samat.launch.submit import read_journal, read_submissions
    from tests.test_launch_safety import sbatch_count

    intent_slurm(slurm_bin, tmp_path)
    # sbatch queues the array, then the submit is killed before it reads the answer
    sbatch = tmp_path / "bin" / "sbatch"
    sbatch.write_text(
        sbatch.read_text().replace(
            'echo "Submitted batch job $id"', 'kill -9 $PPID; echo "Submitted batch job $id"'
        )
    )
    from tests.test_launch import make_grid

    grid = make_grid(tmp_path, seeds=2)
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(grid.model_dump(mode="json")))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [sys.executable, "-m", "samat", "submit", str(grid_file), "--executor", "slurm"]
    killed = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert killed.returncode == -9 and sbatch_count(tmp_path) == 1
    output = Path(grid.output)
    assert read_submissions(output) == [] and "intent" in read_journal(output)[0]
    again = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "nothing to submit: 0 runs to run, 2 skipped (2 queued)" in again.stdout
    assert sbatch_count(tmp_path) == 1
    assert read_submissions(output)[0]["jobs"] == ["42_0", "42_1"]


def fail_once(monkeypatch: pytest.MonkeyPatch, submit_module) -> None:
    """The next record_submission fails as a full disk would; the one after works."""
    real = submit_module.record_submission

    def fail(*args, **kwargs):
        monkeypatch.setattr(submit_module, "record_submission", real)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(submit_module, "record_submission", fail)


def an_open_intent(tmp_path: Path, slurm_bin, monkeypatch: pytest.MonkeyPatch) -> GridConfig:
    """A grid whose submit queued job 42 and then failed to record it: an open intent."""
    from samat.launch import submit as submit_module
    from samat.launch import submit_grid
    from tests.test_launch import make_grid, recording_console

    intent_slurm(slurm_bin, tmp_path)
    grid = make_grid(tmp_path, seeds=2)
    fail_once(monkeypatch, submit_module)
    with pytest.raises(ConfigError):
        submit_grid(grid, executor="slurm", console=recording_console())
    return grid


def test_an_intent_whose_array_is_gone_is_closed_and_its_runs_queued(
    tmp_path: Path, slurm_bin, monkeypatch: pytest.MonkeyPatch
) -> None:
    from samat.launch import submit_grid
    from samat.launch.submit import read_journal
    from tests.test_launch import recording_console
    from tests.test_launch_safety import sbatch_count

    grid = an_open_intent(tmp_path, slurm_bin, monkeypatch)
    (tmp_path / "gone-1").touch()  # the array was cancelled and has left the queue
    console = recording_console()
    assert submit_grid(grid, executor="slurm", console=console) == 0
    assert "submitted SLURM job 43" in console.export_text() and sbatch_count(tmp_path) == 2
    assert [e.get("closed") for e in read_journal(Path(grid.output)) if "intent" in e][:2] == [
        None,
        True,
    ]


def test_an_open_intent_with_a_silent_scheduler_queues_nothing(
    tmp_path: Path, slurm_bin, monkeypatch: pytest.MonkeyPatch
) -> None:
    from samat.launch import scheduler, submit_grid
    from tests.test_launch import recording_console
    from tests.test_launch_safety import sbatch_count

    grid = an_open_intent(tmp_path, slurm_bin, monkeypatch)
    monkeypatch.setattr(scheduler, "QUERY_TIMEOUT_S", 0.5)
    slurm_bin("squeue", "exit 1")
    console = recording_console()
    assert submit_grid(grid, executor="slurm", console=console) == 1
    assert "2 runs recorded as queued or running not resubmitted" in console.export_text()
    assert sbatch_count(tmp_path) == 1


# -- damaged run files (item 9) -------------------------------------------------------------------


def damaged_output(tmp_path: Path):
    import copy

    from samat.store import prepare
    from tests.conftest import TINY_BASE, finish

    grid = GridConfig(
        name="d", output=tmp_path / "out", base=copy.deepcopy(TINY_BASE), seeds=[0, 1, 2]
    )
    runs = [prepare(spec) for spec in expand(grid)]
    for run in runs:
        finish(run)
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(grid.model_dump(mode="json")))
    return grid_file, runs


def test_a_state_json_with_wrong_types_reads_as_defaults(tmp_path: Path) -> None:
    from samat.store import RunState

    _, runs = damaged_output(tmp_path)
    runs[1].file("state.json").write_text(
        json.dumps({"state": 5, "attempts": "x", "job_id": [1], "trained": "yes", "host": "h"})
    )
    state = runs[1].state()
    assert (state.state, state.attempts, state.job_id, state.trained) == ("pending", 0, None, False)
    assert state.host == "h"  # the well-typed fields are kept
    assert RunState.from_json({"attempts": True}).attempts == 0  # a bool is no count
    result = CliRunner().invoke(cli, ["status", str(tmp_path / "out")])
    assert result.exit_code == 0, repr(result.exception)
    assert "3 runs: 3 done" in result.output


def test_a_non_utf8_config_is_one_line_and_collect_lists_the_other_runs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    grid_file, runs = damaged_output(tmp_path)
    bad = runs[1].file("config.yaml")
    bad.write_bytes(b"\xff\xfe data: {name: \x80}")
    result = CliRunner().invoke(cli, ["collect", str(tmp_path / "out")])
    assert result.exit_code == 0, repr(result.exception)
    assert "2/2 runs done" in result.output
    assert f"{bad}: not UTF-8 text; restore or rewrite the file; run {runs[1].run_id} left out" in (
        caplog.text
    )
    result = CliRunner().invoke(cli, ["submit", str(grid_file), "--dry-run", "--executor", "local"])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {bad}: not UTF-8 text; restore or rewrite the file"


def test_deeply_nested_json_and_yaml_are_damaged_files_not_tracebacks(tmp_path: Path) -> None:
    _, runs = damaged_output(tmp_path)
    runs[1].file("result.json").write_text("[" * 100_000 + "]" * 100_000)
    result = CliRunner().invoke(cli, ["status", str(tmp_path / "out")])
    assert result.exit_code == 0, repr(result.exception)
    assert "3 runs: 2 done, 1 pending" in result.output  # its result is unreadable: not done
    # libyaml refuses very deep nesting itself; below its limit, Python's recursion would end
    # the size check: either is one line about the file
    for depth in (900, 5000):
        deep = tmp_path / f"deep{depth}.yaml"
        deep.write_text("name: x\nbase: " + "[" * depth + "]" * depth + "\n")
        with pytest.raises(ConfigError) as caught:
            load_grid(deep)
        assert str(caught.value).startswith(f"{deep}: ") and "\n" not in str(caught.value)


def test_a_journal_entry_with_a_bad_time_is_read_as_the_oldest(tmp_path: Path, slurm_bin) -> None:
    from samat.launch import submit_grid
    from samat.launch.submit import SUBMISSIONS
    from tests.test_launch import recording_console
    from tests.test_launch_safety import fake_slurm

    fake_slurm(slurm_bin, tmp_path)
    grid_file, runs = damaged_output(tmp_path)
    entry = {"time": "yesterday", "grid": "d", "array": "4", "runs": [runs[0].run_id]}
    (tmp_path / "out" / SUBMISSIONS).write_text(json.dumps({**entry, "jobs": ["4_0"]}) + "\n")
    console = recording_console()
    assert submit_grid(load_grid(grid_file), executor="slurm", console=console) == 0
    assert "nothing to submit: 0 runs to run, 3 skipped (3 done)" in console.export_text()


def test_collect_out_into_a_missing_folder_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    damaged_output(tmp_path)
    target = tmp_path / "missing" / "table.csv"
    for fmt in ("csv", "table"):
        result = CliRunner().invoke(
            cli, ["collect", str(tmp_path / "out"), "--format", fmt, "--out", str(target)]
        )
        assert result.exit_code == 2
        assert result.output.strip() == (
            f"error: {target}: the folder {target.parent} does not exist; create it or write "
            "somewhere else"
        )
    assert not target.parent.exists()


# -- one writer per run (item 5) ------------------------------------------------------------------


def test_a_run_is_trained_by_one_process_at_a_time_and_freed_by_kill_9(
    tmp_path: Path, slurm_bin
) -> None:
    """A `samat run` holds the run's claim: while it lives (here frozen with SIGSTOP, so that
    the checks cannot race its end), a second execute refuses without touching the run, submit
    counts it as running; kill -9 frees it for the next one."""
    import signal

    from samat import claim
    from samat.launch.submit import select_runs
    from samat.store import prepare
    from samat.train import execute
    from tests.test_launch import make_grid

    slurm_bin("squeue", "exit 0")
    slurm_bin("sacct", "exit 0")
    grid = make_grid(tmp_path, seeds=1)
    grid.base["train"]["epochs"] = 50  # longer than the test needs: it is stopped, then killed
    (spec,) = expand(grid)
    run = prepare(spec)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    child = subprocess.Popen([sys.executable, "-m", "samat", "run", str(run.path)], env=env)
    try:
        deadline = time.monotonic() + 300
        while claim.holder(run.path) is None:
            assert child.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        child.send_signal(signal.SIGSTOP)
        who = claim.holder(run.path)
        assert who.startswith(f"pid {child.pid} on ")
        before = run.file("state.json").read_bytes()
        with pytest.raises(claim.RunClaimed, match=f"by pid {child.pid} on .*not started twice"):
            execute(run.path)
        assert run.file("state.json").read_bytes() == before
        assert select_runs([spec])[spec.run_id].kind == "running"
        # the holder survives another process's look (flock: closing a probe does not drop it)
        assert claim.holder(run.path) == who
    finally:
        child.kill()
        child.wait()
    assert claim.holder(run.path) is None  # the kernel released it with the process
    with claim.claim(run.path):  # and the next one takes it (without training 50 epochs here)
        assert claim.holder(run.path).startswith(f"pid {os.getpid()} on ")


def test_samat_eval_leaves_a_run_that_another_process_holds(tmp_path: Path) -> None:
    from samat import claim
    from samat.launch.submit import evaluate_runs
    from tests.conftest import finish
    from tests.test_launch import fake_runs, recording_console

    runs = fake_runs(tmp_path, 2)
    for run in runs:
        finish(run)
    attack = {"attack": "fgsm", "eps": 0.05, "label": "extra"}
    from samat.config import AttackSpec

    with claim.claim(runs[0].path, job_id="9_0"):
        console = recording_console()
        code = evaluate_runs(
            tmp_path / "out",
            [AttackSpec.model_validate(attack)],
            n_examples=None,
            executor="local",
            console=console,
        )
    assert code == 0
    text = console.export_text()
    assert (
        "1 run to evaluate, 1 skipped (1 busy in another process or job: see samat status)" in text
    )
    assert "extra" not in json.dumps(runs[0].eval_request().model_dump(mode="json"))
    assert "extra" in json.dumps(runs[1].eval_request().model_dump(mode="json"))


def test_kill_9_of_a_local_submit_stops_its_runs_with_their_progress_stored(
    tmp_path: Path,
) -> None:
    """submitit's local controllers outlive the submit that started them: without a watch, a
    killed `samat submit` left its runs training, unreported, holding their claims. Now each
    run stops at a step boundary (checkpoint written, claim released) and the next submit
    resumes it."""
    from samat import claim
    from samat.launch.submit import select_runs
    from tests.test_launch import make_grid

    grid = make_grid(tmp_path, seeds=1)
    grid.base["train"]["epochs"] = 500  # far longer than the test: only a stop ends it
    (spec,) = expand(grid)
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(grid.model_dump(mode="json", exclude_unset=True)))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    submit = subprocess.Popen(
        [sys.executable, "-m", "samat", "submit", str(grid_file), "--executor", "local"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    run_dir = Path(spec.run_dir)
    try:
        deadline = time.monotonic() + 300
        # wait for the first epoch's checkpoint: the run is training in its own process
        while not (run_dir / "checkpoint.safetensors").exists():
            assert submit.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        who = claim.holder(run_dir)
        assert who is not None and not who.startswith(f"pid {submit.pid} ")
        holder_pid = int(who.split()[1])
    finally:
        submit.kill()
        submit.wait()
    deadline = time.monotonic() + 300
    while claim.holder(run_dir) is not None:
        assert time.monotonic() < deadline, "the run went on training after its submit died"
        time.sleep(0.05)
    while _alive(holder_pid):  # the run's process ends too, not only its claim
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert (
        "the samat submit that started this run is gone: stopping it"
        in (run_dir / "log").read_text()
    )
    assert json.loads((run_dir / "state.json").read_text())["trained"] is False
    assert select_runs([spec])[spec.run_id].kind == "train"  # the next submit resumes it


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (not yet reaped by the controller, itself orphaned) no longer runs
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_sigterm_stops_an_in_process_task_with_its_progress_stored(tmp_path: Path) -> None:
    """Preemption without a container: SIGTERM is handled like the time-limit signal (stop at a
    step boundary, checkpoint), then its own handler runs (submitit's, here a recorder)."""
    import signal
    import threading

    from samat.evaluate import Interrupted
    from samat.launch import RunTask
    from samat.store import prepare
    from tests.test_launch import make_grid

    grid = make_grid(tmp_path, seeds=1)
    grid.base["train"]["epochs"] = 200
    (spec,) = expand(grid)
    run = prepare(spec)

    def after_first_epoch() -> None:
        deadline = time.monotonic() + 300
        while not run.metrics() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    seen: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda s, f: seen.append(s))
    try:
        sender = threading.Thread(target=after_first_epoch, daemon=True)
        sender.start()
        with pytest.raises(Interrupted):
            RunTask(run.path)()
        sender.join(timeout=60)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert seen == [signal.SIGTERM]
    assert 1 <= len(run.metrics()) < 200 and run.file("checkpoint.safetensors").is_file()
    assert "stopped: progress is stored" in run.file("log").read_text()


def test_a_file_system_without_locks_is_one_line(tmp_path: Path, monkeypatch) -> None:
    import errno
    import fcntl

    from samat import claim

    def no_locks(fd, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(ConfigError) as caught, claim.claim(tmp_path):
        pass
    assert str(caught.value) == (
        f"{tmp_path / '.claim'}: this file system does not support locks (Function not "
        "implemented); put the output directory on one that does (Lustre: mount with -o flock)"
    )
    assert claim.holder(tmp_path) is None  # nobody can hold what cannot be taken


def test_leftover_temp_folders_of_a_killed_prepare_are_cleaned(tmp_path: Path, slurm_bin) -> None:
    from samat.launch import submit_grid
    from tests.test_launch import make_grid, recording_console
    from tests.test_launch_safety import fake_slurm

    fake_slurm(slurm_bin, tmp_path)
    grid = make_grid(tmp_path, seeds=1)
    runs = Path(grid.output) / "runs"
    old, fresh = runs / ".abc123def456.x1y2.tmp", runs / ".abc123def456.z3w4.tmp"
    for folder in (old, fresh):
        folder.mkdir(parents=True)
        (folder / "config.yaml").write_text("half")
    past = time.time() - 3600
    os.utime(old, (past, past))
    assert submit_grid(grid, executor="slurm", console=recording_console()) == 0
    assert not old.exists() and fresh.exists()  # a prepare in progress keeps its own


def test_an_infrastructure_failure_is_retried_a_bounded_number_of_times(tmp_path: Path) -> None:
    from samat.launch.submit import select_runs
    from samat.store import MAX_INFRA_FAILURES, RunDir
    from tests.test_launch import fake_runs, make_grid

    run = fake_runs(tmp_path, 1)[0]
    (spec,) = expand(make_grid(tmp_path, seeds=1))
    kinds = []
    for _ in range(MAX_INFRA_FAILURES):
        kinds.append(select_runs([spec])[spec.run_id].kind)
        run.mark_failed("node lost", deterministic=False)
    assert kinds == ["train"] * MAX_INFRA_FAILURES
    assert select_runs([spec])[spec.run_id].kind == "failed"
    assert select_runs([spec], retry_failed=True)[spec.run_id].kind == "train"
    assert RunDir(run.path).state().extra["infra_failures"] == MAX_INFRA_FAILURES
    run.mark_done()  # a success starts the count again
    assert "infra_failures" not in RunDir(run.path).state().extra


def test_eval_of_one_run_takes_its_output_directorys_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import samat.launch.submit as submit_module
    from samat.launch.submit import evaluate_runs
    from tests.test_launch import fake_runs, recording_console

    runs = fake_runs(tmp_path, 1)
    taken: list[Path] = []
    real = submit_module.output_lock

    def recording_lock(output, **kwargs):
        taken.append(Path(output))
        return real(output, **kwargs)

    monkeypatch.setattr(submit_module, "output_lock", recording_lock)
    for target in (runs[0].path, tmp_path / "out"):
        evaluate_runs(target, [], n_examples=None, executor="local", console=recording_console())
    assert taken == [tmp_path / "out", tmp_path / "out"]


# -- records tied to the weights they measured (item 8) -------------------------------------------


def test_records_of_an_earlier_training_are_not_mixed_with_new_weights(tmp_path: Path) -> None:
    """An interrupted --force: the checkpoint moved aside, the old records and result left. The
    new training draws a new lineage; the old records count as missing and are measured anew."""
    from samat.store import CHECKPOINT, RunDir
    from samat.train import execute
    from tests.test_train import make_run

    run = make_run(tmp_path, train={"epochs": 1})
    first = execute(run.path)
    old_lineage = RunDir(run.path).lineage()
    assert old_lineage and first["lineage"] == old_lineage
    records = {p.name: json.loads(p.read_text()) for p in run.eval_dir().glob("*.json")}
    assert records and all(r["lineage"] == old_lineage for r in records.values())
    # the kill came after the checkpoint was moved aside, before evals/ and result.json
    run.file(CHECKPOINT).unlink()
    from tests.conftest import set_state

    set_state(run, trained=False, state="pending")
    second = execute(run.path)
    new_lineage = RunDir(run.path).lineage()
    assert new_lineage != old_lineage and second["lineage"] == new_lineage
    again = {p.name: json.loads(p.read_text()) for p in run.eval_dir().glob("*.json")}
    assert again.keys() == records.keys()
    for name, record in again.items():
        # measured anew on the new weights, not kept from the earlier training
        assert record["lineage"] == new_lineage and record != records[name], name


def test_a_stale_record_counts_as_missing(tmp_path: Path) -> None:
    from samat.store import missing_records
    from tests.conftest import finish
    from tests.test_launch import fake_runs

    run = fake_runs(tmp_path, 1)[0]
    finish(run)  # records of a run of an earlier release: no lineage anywhere, all its own
    assert missing_records(run, run.config()) == [] and run.is_complete()
    run.start_lineage("newtraining")
    assert len(missing_records(run, run.config())) == 3 and not run.is_complete()


def test_a_checkpoint_best_copied_from_another_run_is_refused(tmp_path: Path) -> None:
    from samat.store import CHECKPOINT_BEST, read_checkpoint, write_checkpoint
    from samat.train import execute
    from tests.test_train import make_run

    validated = {"validation": {"size": 64}, "keep": "best", "epochs": 1}
    donor = make_run(tmp_path / "a", train=validated, seed=1)
    execute(donor.path)
    target = make_run(tmp_path / "b", train=validated, seed=2)
    execute(target.path)
    tensors, meta = read_checkpoint(donor.file(CHECKPOINT_BEST))
    write_checkpoint(target.file(CHECKPOINT_BEST), tensors, meta)
    target.file("result.json").unlink()
    with pytest.raises(ConfigError, match=f"belongs to another run \\({donor.run_id}\\)"):
        execute(target.path)


def test_a_lock_held_too_long_is_one_line_naming_its_holder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from samat.launch.lock import output_lock

    output = tmp_path / "out"
    child = f"""
import os, sys, time
from samat.launch.lock import output_lock
with output_lock({str(output)!r}, purpose="submit"):
    print("locked", flush=True)
    sys.stdin.read()  # until the test closes it
"""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    holder = subprocess.Popen(
        [sys.executable, "-c", child],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        monkeypatch.setenv("SAMAT_LOCK_WAIT_S", "0.5")
        with pytest.raises(ConfigError) as caught, output_lock(output, purpose="eval"):
            pass
        assert str(caught.value).startswith(f"{output} is locked by samat submit, pid {holder.pid}")
        assert str(caught.value).endswith(
            "for more than 0.5 s; wait for it to finish, then try again"
        )
        monkeypatch.setenv("SAMAT_LOCK_WAIT_S", "soon")
        wrong = pytest.raises(ConfigError, match="SAMAT_LOCK_WAIT_S='soon' is not a number")
        with wrong, output_lock(output, purpose="eval"):
            pass
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


def test_a_claim_file_this_user_may_not_write_still_claims(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A container's user (Apptainer runs as another account) made .claim: the flock needs no
    write access, so the claim still holds; only the holder's name is not written."""
    from samat import claim

    (tmp_path / claim.CLAIM_FILE).write_text('{"pid": 1, "host": "elsewhere"}')
    real_open = os.open

    def open_(path, flags, mode=0o777, **kwargs):
        if str(path).endswith(claim.CLAIM_FILE) and flags & os.O_RDWR:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, mode, **kwargs)

    monkeypatch.setattr(os, "open", open_)
    with claim.claim(tmp_path):
        assert claim.holder(tmp_path) == "pid 1 on elsewhere"  # held, under the old name
    assert claim.holder(tmp_path) is None


def test_accounting_is_asked_about_every_users_jobs(slurm_bin) -> None:
    """A teammate's ended job is in accounting only for `sacct --allusers` (as SLURM answers a
    non-root user), and the controller has forgotten it."""
    from samat.launch import scheduler

    slurm_bin("squeue", 'echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1')
    slurm_bin("sacct", 'case "$*" in *--allusers*) echo "77_0|COMPLETED|00:05:00" ;; esac')
    assert scheduler.job_states(["77_0"]) == {"77_0": scheduler.JobInfo("COMPLETED", "00:05:00")}
