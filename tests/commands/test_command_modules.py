"""The command-module contract, the generated parser's flag spellings, and recorded commands that reproduce a run."""

import dataclasses
import importlib
import shlex

import pytest

from diffalign.cli import COMMANDS, build_parser, main
from diffalign.commands import command_line
from diffalign.evaluation.benchmark import BenchConfig
from diffalign.evaluation.calibration import CalibrateConfig, EMSConfig
from diffalign.options import from_args


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_module_follows_the_contract(name):
    module = importlib.import_module(f"diffalign.commands.{name}")
    assert module.NAME == name and module.HELP and len(module.DESCRIPTION) > len(module.HELP)
    assert dataclasses.is_dataclass(module.CONFIG) and callable(module.run)
    assert all(f.metadata.get("help") for f in dataclasses.fields(module.CONFIG))


def parse(command: str):
    args = build_parser().parse_args(shlex.split(command)[1:])
    return from_args(args.module.CONFIG, args)


def test_dashed_spellings_of_old_scripts_still_parse():
    old = parse("diffalign ems --grid-size 8 --num-samples 32 --t-start 500 --fd-step 1e-2 --quiet")
    assert old == EMSConfig(grid_size=8, num_samples=32, t_start=500.0, fd_step=1e-2, quiet=True)
    assert parse("diffalign bench --num-samples 3 --reference-samples 2") == parse(
        "diffalign bench --num_samples 3 --reference_samples 2"
    )


@pytest.mark.parametrize(
    "config",
    [
        BenchConfig(),
        BenchConfig(model="gmm", nfe=[4, 8], seeds=[3], samplers=["dpm_solver_pp:solver_order=3"], quiet=True),
        BenchConfig(model="some dir/sd", prompts=["a red car", "a cat"], guidance_scale=5.0, fid="inception"),
        EMSConfig(model="gmm", grid_size=8, t_start=500.0, quiet=False),
        CalibrateConfig(nfe=[4, 5], guidance_scale=[2.0, 4.0], options="solver_order=3", cpr_preview=[11]),
    ],
)
def test_the_recorded_command_reproduces_the_config(config):
    name = {BenchConfig: "bench", EMSConfig: "ems", CalibrateConfig: "calibrate"}[type(config)]
    command = command_line(name, config)
    assert command.startswith(f"diffalign {name} --model ") and parse(command) == config


def test_readme_benchmark_command_is_recorded_as_typed():
    command = "diffalign bench --model digits --out docs/bench --quiet"
    assert command_line("bench", parse(command)) == command


@pytest.mark.parametrize(
    "argv,message",
    [
        (["calibrate", "--nfe", "4", "0"], "--nfe must be >= 1, got [4, 0]"),
        (["calibrate", "--options", "solver_order"], "must look like key=value"),
        (["bench", "--model", "digits", "--fid", "inception"], "--fid inception applies to diffusers pipelines"),
    ],
)
def test_config_errors_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_configs_check_themselves_from_python_too():
    with pytest.raises(ValueError, match="--nfe must be >= 1"):
        CalibrateConfig(nfe=[0])
    with pytest.raises(ValueError, match="'gmm' has no attention"):
        BenchConfig(model="gmm", attention="sdpa")
    with pytest.raises(ValueError, match="fid='other' is not allowed"):
        BenchConfig(fid="other")
