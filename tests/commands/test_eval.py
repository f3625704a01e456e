"""``diffalign eval`` as a command module: the contract cli.py relies on, its flags, and a run from parsed flags."""

import argparse
import json
from pathlib import Path

import pytest
import torch

from diffalign.commands import eval as eval_command
from diffalign.evaluation.harness import EvalConfig
from diffalign.models.digits import load_digits_pipeline
from diffalign.options import add_arguments, from_args, parse_args


def test_the_module_follows_the_command_contract():
    assert eval_command.NAME == "eval" and eval_command.CONFIG is EvalConfig
    assert (
        eval_command.HELP and "%" not in eval_command.HELP and len(eval_command.DESCRIPTION) > len(eval_command.HELP)
    )
    parser = argparse.ArgumentParser(description=eval_command.DESCRIPTION)
    add_arguments(parser, eval_command.CONFIG)
    text = parser.format_help()
    for flag in ("--lora", "--weights", "--prompts", "--num_seeds", "--sampler", "--nfe", "--rewards", "--bootstrap"):
        assert flag in text
    assert "95% percentile-bootstrap" in text


def test_run_from_flags_prints_the_table_and_writes_the_files(tmp_path, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the digits model is tiny; one thread avoids OpenMP spinning on a shared machine
    try:
        load_digits_pipeline(True).save_pretrained(tmp_path / "copy")
        argv = ["--weights", str(tmp_path / "copy"), "--num-seeds", "3", "--nfe", "3", "--out", str(tmp_path / "o")]
        config = parse_args(
            EvalConfig, argv + ["--guidance_scale", "1.5", "--bootstrap", "100", "--bootstrap_unit", "prompt"]
        )
        assert eval_command.run(config) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "| digits | " in printed and "wrote " in printed
    report = json.loads(Path(tmp_path / "o" / "eval.json").read_text())
    assert report["nfe"] == 3 and report["guidance_scale"] == 1.5 and report["seeds"] == [0, 1, 2]
    assert report["bootstrap"]["unit"] == "prompt" and "resamples of the prompts" in printed
    assert report["rewards"]["digits"]["win_rate"] == 0.5  # the same weights: every cell is a tie


def test_bad_flags_fail_in_the_parser():
    parser = argparse.ArgumentParser()
    add_arguments(parser, EvalConfig)
    with pytest.raises(SystemExit):
        parser.parse_args(["--dtype", "float64"])
    with pytest.raises(ValueError, match="no tuned model"):
        from_args(EvalConfig, parser.parse_args([]))
