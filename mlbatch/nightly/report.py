"""The nightly summary as a short plain-text report, for the console."""

from __future__ import annotations

from typing import Any

from .drift import METRICS


def _short(uri: str, width: int = 48) -> str:
    return uri if len(uri) <= width else "..." + uri[-(width - 3):]


def nightly_table(summary: dict[str, Any]) -> str:
    """A short plain-text report of a nightly summary, for the console."""
    s, d = summary, summary["drift"]
    reasons: dict[str, int] = {}
    for item in s["labeled"]:
        reasons[item["reason"]] = reasons.get(item["reason"], 0) + 1
    why = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items()))
    lines = [f"nightly {s['date']}: {s['status']}  ->  {s['partition']}",
             f"model {s['model']['name']} {s['model']['version']};  {s['manifests_found']} manifests under the input: "
             f"{len(s['labeled'])} labeled{f' ({why})' if why else ''}, {s['unchanged']} already labeled, "
             f"{len(s['failed'])} failed"]
    for item in s["labeled"]:
        extra = " resumed" if item["resumed"] else ""
        if item["replaced_run"]:
            extra += f" replaces {item['replaced_run']} ({item['removed_files']} files removed)"
        lines.append(f"  {item['reason']:<8} {_short(item['manifest']):<48} {item['rows']:>7} rows "
                     f"{item['errors']:>5} errors  dt={item['dt']}{extra}")
    for item in s["failed"]:
        lines.append(f"  FAILED   {_short(item['manifest'])}: {item['error']}")
    older = s["older_version"]
    if older["count"]:
        lines.append(f"{older['count']} manifests were labeled by an older model version and are left alone "
                     "(--relabel labels them with this one)")
    if s["missing"]:
        lines.append(f"{len(s['missing'])} manifests in the state are no longer under the input (their rows are kept)")
    table = s.get("table")
    if table and "error" in table:
        lines.append(f"table {table['identifier']}: NOT committed ({table['error']}); the next night commits it")
    elif table:
        lines.append(f"table {table['identifier']}: snapshot {table['snapshot_id']} ({table['added_files']} files "
                     f"added, {table['dropped_files']} dropped)")
    night = s["night"]
    lines.append(f"night {s['date']}: {night['runs']} runs, {night['rows']} rows ({night['errors']} errors)")
    lines.append(f"drift ({d['status']}): {d['message']}")
    if d["labels"]:
        head = f"{'trailing':>10}{'diff':>8}"
        lines.append(f"  {'label':<16}{'pos rate':>9}{head}   {'mean prob':>9}{head}")
        for name, entry in d["labels"].items():
            cells = []
            for metric in METRICS:
                e = entry[metric]
                cells.append(f"{_num(e['tonight']):>9}{_num(e['trailing']):>10}{_num(e['difference'], True):>8}"
                             f"{' *' if e['drifted'] else '  '}")
            lines.append(f"  {name:<16}{cells[0]} {cells[1]}")
        if d["drifted"]:
            lines.append(f"  * beyond the bound {d['bound']} (trailing nights: {', '.join(d['compared_with'])})")
    return "\n".join(lines)


def _num(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    value = round(value, 3) + 0.0  # no "-0.000"
    return f"{value:+.3f}" if signed else f"{value:.3f}"
