import pytest

from samat.config import ConfigError, GridConfig, validate_run
from samat.grid import expand, group_id, run_id


def grid(**fields):
    return GridConfig.model_validate({"name": "g", "output": "out", **fields})


def test_run_id_ignores_key_order_and_number_spelling():
    a = validate_run({"train": {"epochs": 3, "optimizer": {"lr": 0.1, "name": "sgd"}}})
    b = validate_run({"train": {"optimizer": {"name": "sgd", "lr": 1e-1}, "epochs": 3}})
    assert run_id(a) == run_id(b)
    assert len(run_id(a)) == 12
    c = validate_run({"train": {"epochs": 4}})
    assert run_id(a) != run_id(c)


def test_group_id_ignores_seed_only():
    a, b = validate_run({"seed": 0}), validate_run({"seed": 1})
    assert run_id(a) != run_id(b)
    assert group_id(a) == group_id(b)


def test_variants_sweep_only_their_own_keys():
    specs = expand(
        grid(
            variants=[
                {"method.name": "standard"},
                {"method.name": "sam", "method.rho": [0.1, 0.5]},
                {"method.name": "pgd_at", "method.eps": ["1/255", "8/255"]},
            ],
            seeds=[0, 1, 2],
        )
    )
    assert len(specs) == (1 + 2 + 2) * 3
    labels = sorted({s.label for s in specs})
    assert labels == [
        "PGD-AT linf eps=1/255",
        "PGD-AT linf eps=8/255",
        "SAM rho=0.1",
        "SAM rho=0.5",
        "SGD",
    ]
    assert all(s.run_dir.parent.name == "runs" and s.run_dir.name == s.run_id for s in specs)


def test_cartesian_sweep_times_variants():
    specs = expand(
        grid(
            sweep={"train.batch_size": [64, 128], "model.width": [8, 16]},
            variants=[{"method.name": "standard"}, {"method.name": "sam"}],
        )
    )
    assert len(specs) == 2 * 2 * 2
    assert {(s.config.train.batch_size, s.config.model.width) for s in specs} == {
        (64, 8),
        (64, 16),
        (128, 8),
        (128, 16),
    }


def test_include_and_exclude():
    specs = expand(
        grid(
            variants=[{"method.name": "sam", "method.rho": [0.1, 0.2, 0.3]}],
            exclude=[{"method.rho": 0.2}],
            include=[{"method.name": "pgd_at", "method.eps": "8/255"}],
        )
    )
    rhos = sorted(s.config.method.rho for s in specs if s.config.method.name == "sam")
    assert rhos == [0.1, 0.3]
    assert sum(s.config.method.name == "pgd_at" for s in specs) == 1
    excluded = expand(
        grid(
            variants=[{"method.name": "pgd_at", "method.eps": ["1/255", "8/255"]}],
            exclude=[{"method.eps": "8/255"}],
        )
    )
    assert [round(s.config.method.eps * 255) for s in excluded] == [1]


def test_duplicates_collapse_and_order_is_stable():
    g = grid(variants=[{"method.name": "standard"}, {"method.name": "standard"}], seeds=[1, 0])
    first, second = expand(g), expand(g)
    assert [s.run_id for s in first] == [s.run_id for s in second]
    assert len(first) == 2


def test_invalid_variant_is_reported_before_anything():
    with pytest.raises(ConfigError, match="unknown key 'method.rho'"):
        expand(grid(variants=[{"method.name": "pgd_at", "method.rho": 0.1}]), "g.yaml")


def test_empty_grid_is_an_error():
    with pytest.raises(ConfigError, match="no runs"):
        expand(grid(seeds=[]))


def test_run_ids_did_not_change_when_keys_were_added():
    """Keys added later (segmentation, text) stay out of the identity at their defaults: these
    ids were handed out before they existed."""
    from pathlib import Path

    from samat.config import RunConfig, load_grid

    assert run_id(RunConfig()) == "679a5ac673bc"
    ids = [
        s.run_id for s in expand(load_grid(Path(__file__).parent.parent / "configs" / "demo.yaml"))
    ]
    assert ids[:4] == ["894fc16301db", "83a5ca78597e", "a82c717c3349", "95357249a5b1"]
    # a late key away from its default is part of the identity
    assert run_id(RunConfig(data={"name": "digits", "max_length": 64})) != run_id(RunConfig())
