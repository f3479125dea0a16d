"""Deterministic synthetic datasets: street scenes, glyphs on clutter, coloured shapes with counts."""

from .dataset import KINDS, SPLITS, Kind, SynthConfig, make_dataset, manifest_schema, render_frame
from .scenes import CAMERAS, LABELS, draw_scene

__all__ = ["CAMERAS", "KINDS", "LABELS", "SPLITS", "Kind", "SynthConfig", "draw_scene", "make_dataset",
           "manifest_schema", "render_frame"]
