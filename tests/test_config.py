from pathlib import Path

import pytest

from samat.config import (
    ConfigError,
    GridConfig,
    RunConfig,
    format_budget,
    load_grid,
    load_run,
    parse_budget,
    validate_run,
)


@pytest.mark.parametrize(
    ("text", "value"),
    [("8/255", 8 / 255), ("8 / 255", 8 / 255), ("0.1", 0.1), ("1e-1", 0.1), (0.25, 0.25), (1, 1)],
)
def test_parse_budget(text, value):
    assert parse_budget(text) == pytest.approx(value, rel=1e-15)


def test_budget_fraction_equals_float():
    a = validate_run({"method": {"name": "pgd_at", "eps": "8/255"}})
    b = validate_run({"method": {"name": "pgd_at", "eps": 8 / 255}})
    assert a == b
    assert a.method.eps == pytest.approx(0.0313725490196)


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"train": {"epoch": 3}}, "unknown key 'train.epoch'"),
        ({"train": {"epochs": "many"}}, "train.epochs"),
        ({"method": {"name": "pgd_at", "eps": -0.1}}, "method.eps"),
        ({"method": {"name": "sam", "rho": "x/255"}}, "method.rho"),
        ({"method": {"name": "sam", "eps": 0.1}}, "unknown key 'method.eps'"),
        ({"eval": {"attacks": [{"attack": "pgd", "eps": -1}]}}, "eval.attacks.0"),
        ({"data": {"name": "cifar10"}}, "data.root"),
        ({"train": {"schedule": {"milestones": [75]}}}, "milestones"),
    ],
)
def test_bad_run_configs_give_one_line_with_the_key(data, needle):
    with pytest.raises(ConfigError) as info:
        validate_run(data, "x.yaml")
    message = str(info.value)
    assert needle in message
    assert message.startswith("x.yaml: ")
    assert "\n" not in message


def test_defaults_follow_the_papers():
    config = RunConfig()
    assert config.train.optimizer.lr == 0.1
    assert config.train.optimizer.momentum == 0.9
    assert config.train.optimizer.weight_decay == 5e-4
    assert config.train.schedule.milestones == [0.75, 0.9]
    assert config.train.batch_size == 128


def test_grid_output_defaults_to_results_name(write_yaml):
    grid = load_grid(write_yaml({"name": "g"}))
    assert grid.output == Path("results/g")


def test_grid_unknown_top_level_key(write_yaml):
    with pytest.raises(ConfigError, match="unknown key 'sweeps'"):
        load_grid(write_yaml({"name": "g", "sweeps": {}}))


def test_grid_container_needs_image():
    with pytest.raises(ValueError, match="container.image"):
        GridConfig.model_validate({"name": "g", "container": {"runtime": "apptainer"}})


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_run(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run(bad)


def test_format_budget():
    assert [format_budget(e) for e in (8 / 255, 128 / 255, 0.1, 0.0, 1.0, 2.5)] == [
        "8/255",
        "128/255",
        "0.1",
        "0",
        "1",
        "2.5",
    ]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {
                "data": {"name": "rotten_tomatoes", "root": "x"},
                "model": {"name": "distilbert", "pretrained": "m"},
                "method": {"name": "pgd_at"},
            },
            "method 'pgd_at' perturbs pixels; a text run's inputs are tokens",
        ),
        (
            {"data": {"name": "rotten_tomatoes", "root": "x"}, "model": {"name": "distilbert"}},
            "a text run needs model.pretrained",
        ),
        (
            {"data": {"name": "stanford_background", "root": "x"}, "eval": {"attacks": ["stadv"]}},
            "preset 'stadv' is an image attack; a segmentation run takes attack specs of kind pgd",
        ),
        (
            {"data": {"name": "voc2012", "root": "x"}, "eval": {"attacks": [{"attack": "fgsm"}]}},
            "attack 'fgsm' does not apply to a segmentation run; use pgd",
        ),
        (
            {"eval": {"attacks": [{"attack": "iga"}]}},
            "attack 'iga' does not apply to an image run",
        ),
        ({"data": {"name": "digits", "generate": {}}}, "data.generate applies to segmentation"),
        ({"data": {"name": "voc2012"}}, "data set 'voc2012' needs `data.root`"),
        (
            {"data": {"name": "voc2012", "root": "x"}, "train": {"validation": {"size": 10}}},
            "train.validation applies to image classification, not to a segmentation run",
        ),
    ],
)
def test_a_run_fits_its_task(data, message):
    with pytest.raises(ConfigError, match="^run config: ") as error:
        validate_run(data)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_task_follows_the_data():
    seg = validate_run({"data": {"name": "voc2012", "root": "x"}, "model": {"name": "seg_tiny"}})
    text = validate_run(
        {"data": {"name": "rotten_tomatoes", "root": "x"}, "model": {"pretrained": "m"}}
    )
    assert (RunConfig().task, seg.task, text.task) == ("image", "segmentation", "text")
