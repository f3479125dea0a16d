"""Every default lives in the library's configuration dataclasses: a command given only its required flags
builds exactly the configuration those dataclasses make, so a flag left unset never overrides a default."""

from __future__ import annotations

from dataclasses import asdict, fields

import pytest

from mlbatch.cli import commands
from mlbatch.cli.parser import build_parser
from mlbatch.label.config import LabelConfig
from mlbatch.nightly.config import NightlyConfig
from mlbatch.registry.config import PromoteConfig
from mlbatch.review.export import ExportConfig
from mlbatch.train.config import TrainConfig

REQUIRED = {
    "label": (["label", "--manifest", "m", "--model", "x", "--output", "o"],
              lambda a: commands.label_config(a), LabelConfig(manifests=["m"], model="x", output="o")),
    "nightly": (["nightly", "--input", "i", "--model", "x", "--output", "o"],
                lambda a: commands.config_of(NightlyConfig, a, thresholds=dict(a.thresholds)),
                NightlyConfig(input="i", model="x", output="o")),
    "train": (["train", "--manifest", "m", "--output", "o"], commands.train_config,
              TrainConfig(manifests=["m"], output="o")),
    "models promote": (["models", "promote", "n@1", "--registry", "r", "--eval", "e"],
                       lambda a: commands.config_of(PromoteConfig, a, manifests=a.eval),
                       PromoteConfig(candidate="n@1", registry="r", manifests=["e"])),
    "review export": (["review", "export", "o", "--to", "t", "--most-uncertain", "5"],
                      lambda a: commands.config_of(ExportConfig, a, snapshot_id=a.snapshot),
                      ExportConfig(output="o", to="t", most_uncertain=5)),
}


@pytest.mark.parametrize("command", sorted(REQUIRED))
def test_a_flag_left_unset_keeps_the_librarys_default(command):
    argv, build, expected = REQUIRED[command]
    made = build(build_parser().parse_args(argv))
    assert asdict(made) == asdict(expected)


def test_the_helper_fills_every_field_a_flag_of_its_name_sets():
    """A flag named as a field reaches it (here every LabelOptions flag, changed from its default)."""
    args = build_parser().parse_args(["label", "--manifest", "m", "--model", "x", "--output", "o",
                                      "--batch-size", "7", "--rows-per-unit", "9", "--engine", "local",
                                      "--stall-seconds", "3", "--max-error-rate", "0.5", "--mode", "append"])
    config = commands.label_config(args)
    assert (config.batch_size, config.rows_per_unit, config.engine, config.stall_seconds, config.max_error_rate,
            config.mode) == (7, 9, "local", 3.0, 0.5, "append")
    # the fields no label flag is named after: --manifest (plural field), and what only the library sets
    assert {f.name for f in fields(LabelConfig)} - set(vars(args)) == {"manifests", "extra_summary", "state_dir",
                                                                      "progress"}
