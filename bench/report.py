"""Turn raw timings into the three artefacts of `make bench`: results.json, results.md, results.png.

The Markdown puts each modelfs number next to the reference the issue compares it with and the
issue's target, so a reader sees pass/fail without redoing the arithmetic.
"""

from __future__ import annotations

import statistics
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PHASES = ("cold", "warm", "hot")

#: The targets: (ratio or absolute) upper bounds.
TARGET_COLD_VS_S5CMD = 1.0  # the aim beyond: 0.8, by loading the first shard while the rest arrive
TARGET_COLD_VS_S3FS = 0.8
TARGET_COLD_LOAD_CPU_MS = 1.5  # daemon CPU ms per MiB during the cold load
TARGET_CACHE_VS_DISTINCT = 1.05  # cache dir on disk (du) after a cold load / distinct bytes cached
TARGET_WARM_VS_LOCAL = 1.0
TARGET_HOT_VS_LOCAL = 1.05
TARGET_BYPASS_COLD_VS_S5CMD = 1.2  # a page-cache-bypassing loader through modelfs / s5cmd then the same loader
TARGET_RSS_MIB = 400
TARGET_FETCHED = 1.0
TARGET_WARM_CPU_VS_FLOOR = 1.5  # daemon CPU per MiB, warm cat, x the floor (floorfs pread, backing pages dropped)
TARGET_COLD_CPU_MS = 2.0  # daemon CPU ms per MiB, cold cat (the fetch included)

#: A page-cache-bypassing loader's row through modelfs has key K; the same loader on s5cmd-downloaded files, K + this.
LOCAL_SUFFIX = "-local"
THROUGH_MODELFS = ", through modelfs"  # how those two row labels end, after the loader and its reader
ON_LOCAL_COPY = ", on s5cmd-downloaded files"


@dataclass
class SystemResult:
    """One system's raw seconds per phase plus whatever else it measured per repetition."""

    key: str
    name: str
    command: str = ""
    cold: list[float] = field(default_factory=list)
    warm: list[float] = field(default_factory=list)
    hot: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    verified_tensors: int | None = None
    error: str | None = None

    def series(self, phase: str) -> list[float]:
        return list(getattr(self, phase))

    def median(self, phase: str) -> float | None:
        xs = self.series(phase)
        return statistics.median(xs) if xs else None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "command": self.command, "verified_tensors": self.verified_tensors,
                "error": self.error, "phases": {p: summary(self.series(p)) for p in PHASES}, "extra": self.extra}


def from_json(key: str, doc: dict[str, Any]) -> SystemResult:
    """Inverse of SystemResult.to_json, for re-rendering a finished run."""
    phases = {p: list(doc["phases"][p]["raw"]) for p in PHASES}
    return SystemResult(key, doc["name"], doc.get("command", ""), phases["cold"], phases["warm"], phases["hot"],
                        doc.get("extra", {}), doc.get("verified_tensors"), doc.get("error"))


def summary(xs: list[float]) -> dict[str, Any]:
    if not xs:
        return {"n": 0, "raw": []}
    return {"n": len(xs), "median": statistics.median(xs), "min": min(xs), "max": max(xs), "raw": xs}


def _cell(xs: list[float]) -> str:
    if not xs:
        return "—"
    med = statistics.median(xs)
    return f"{med:.2f}" if len(xs) == 1 else f"{med:.2f} ({min(xs):.2f}-{max(xs):.2f})"


@dataclass
class Check:
    """One line of the targets table: modelfs's number against a reference and the issue's bound."""

    what: str
    measured: str  # modelfs's own number, as shown
    reference: str  # what it is compared with, as shown
    ratio: float | None  # the number the bound applies to
    bound: float
    unit: str = "x"

    @property
    def met(self) -> bool | None:
        return None if self.ratio is None else self.ratio <= self.bound

    @property
    def target(self) -> str:
        return f"<= {self.bound:g}{self.unit}"

    def shown_ratio(self) -> str:
        if self.ratio is None:
            return "—"
        digits = 2 if self.unit in ("x", " ms") else 0
        if f"{self.ratio:.{digits}f}" == f"{self.bound:.{digits}f}":
            digits += 2  # "1.20x ... NO" would read as a contradiction
        return f"{self.ratio:.{digits}f}{self.unit}"

    def to_json(self) -> dict[str, Any]:
        return {"what": self.what, "measured": self.measured, "reference": self.reference, "ratio": self.ratio,
                "target": self.target, "met": self.met}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _secs(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f} s"


def checks(results: list[SystemResult], size: int, ceiling: dict[str, Any] | None = None) -> list[Check]:
    """The targets, each computed from medians of this run only (the machine is noisy)."""
    by = {r.key: r for r in results if any(r.series(p) for p in PHASES)}
    m = by.get("modelfs")
    if m is None:
        return []
    out: list[Check] = []
    mc, mw, mh = m.median("cold"), m.median("warm"), m.median("hot")

    s5 = by["s5cmd"].median("cold") if "s5cmd" in by else None
    out.append(Check("cold vs s5cmd download + load", _secs(mc), f"s5cmd {_secs(s5)}", _ratio(mc, s5),
                     TARGET_COLD_VS_S5CMD))
    s3fs = by["s3fs"].median("cold") if "s3fs" in by else None
    out.append(Check("cold vs s3fs cold", _secs(mc), f"s3fs {_secs(s3fs)}", _ratio(mc, s3fs), TARGET_COLD_VS_S3FS))
    cpu = m.extra.get("cold_daemon_cpu_s", [])
    cold_ms = statistics.median(cpu) * 1000 / (size / 2**20) if cpu else None
    out.append(Check("daemon CPU per MiB during the cold load", "—" if cold_ms is None else f"{cold_ms:.2f} ms", "—",
                     cold_ms, TARGET_COLD_LOAD_CPU_MS, " ms"))
    du, distinct = m.extra.get("cache_bytes_after_cold", []), m.extra.get("cache_distinct_bytes", [])
    worst_du = max(du) if du else None
    out.append(Check("cache dir on disk after a cold load (du, max of reps) / distinct bytes cached",
                     "—" if worst_du is None else f"{worst_du / 2**20:.1f} MiB",
                     f"{max(distinct) / 2**20:.1f} MiB" if distinct else "—",
                     _ratio(worst_du, max(distinct) if distinct else None), TARGET_CACHE_VS_DISTINCT))
    local = by.get("local")
    lw, lh = (local.median("warm"), local.median("hot")) if local else (None, None)
    opens, served = m.extra.get("warm_passthrough_opens", []), m.extra.get("warm_bytes_served", [])
    files = m.extra.get("files_opened")
    out.append(Check("warm (a new daemon right after the cold load) vs local disk, page cache dropped", _secs(mw),
                     f"local {_secs(lw)}", _ratio(mw, lw), TARGET_WARM_VS_LOCAL))
    if opens and served:
        size_mib = size / 2**20
        out.append(Check("warm: bytes through the daemon (max of reps; every open by passthrough: 0)",
                         f"{max(served) / 2**20:.1f} MiB", f"{min(opens)} passthrough opens of {files} files",
                         max(served) / 2**20 / size_mib, 0.0))
    out.append(Check("hot vs local disk hot", _secs(mh), f"local {_secs(lh)}", _ratio(mh, lh), TARGET_HOT_VS_LOCAL))
    for through, loc in bypass_pairs(results):
        tc, lc = through.median("cold"), loc.median("cold")
        out.append(Check(f"{through.name.removesuffix(THROUGH_MODELFS)}, cold, through modelfs vs s5cmd then the "
                         "same loader", _secs(tc), _secs(lc), _ratio(tc, lc), TARGET_BYPASS_COLD_VS_S5CMD))

    for label, key in (("cold load", "cold_peak_rss_bytes"), ("4 processes", "four_process_peak_rss_bytes")):
        rss = [x for x in m.extra.get(key, []) if x]
        peak = max(rss) / 2**20 if rss else None
        out.append(Check(f"daemon peak RSS, {label} (max of reps)", "—" if peak is None else f"{peak:.0f} MiB",
                         "—", peak, TARGET_RSS_MIB, " MiB"))
    for label, key in (("cold", "cold_bytes_fetched"), ("4 processes at once", "four_process_bytes_fetched")):
        fetched = m.extra.get(key, [])
        worst = max(fetched) if fetched else None
        out.append(Check(f"bytes fetched / checkpoint, {label} (max of reps)",
                         "—" if worst is None else f"{worst / 2**20:.1f} MiB", f"checkpoint {size / 2**20:.1f} MiB",
                         _ratio(worst, size), TARGET_FETCHED))
    rows = (ceiling or {}).get("rows", {})
    floor = rows.get("floor_pread", {}).get("median_cpu_ms_per_mib")
    warm = rows.get("modelfs_warm_reads", {}).get("median_cpu_ms_per_mib")
    cold = rows.get("modelfs_cold", {}).get("median_cpu_ms_per_mib")
    if rows:
        out.append(Check("daemon CPU per MiB, warm `cat` with every READ through the daemon, vs the floor (floorfs "
                         "pread, backing pages dropped)",
                         "—" if warm is None else f"{warm:.3f} ms", "—" if floor is None else f"floor {floor:.3f} ms",
                         _ratio(warm, floor), TARGET_WARM_CPU_VS_FLOOR))
        out.append(Check("daemon CPU per MiB, cold `cat` (the fetch included)",
                         "—" if cold is None else f"{cold:.3f} ms", "—", cold, TARGET_COLD_CPU_MS, " ms"))
    return out


def cpu_table(results: list[SystemResult], size: int) -> list[str]:
    """Each FUSE daemon's CPU per MiB loaded, per phase (medians): what serving the load cost."""
    rows = []
    for r in results:
        cells = []
        for phase in PHASES:
            xs = r.extra.get(f"{phase}_daemon_cpu_s", [])
            cells.append(f"{statistics.median(xs) * 1000 / (size / 2**20):.2f}" if xs else "—")
        if any(c != "—" for c in cells):
            rows.append(f"| {r.name} | {' | '.join(cells)} |")
    if not rows:
        return []
    return ["", "Daemon CPU per MiB loaded (utime + stime of the FUSE daemon during the load, ms per MiB, median):",
            "", "| daemon | cold | warm | hot |", "| --- | ---: | ---: | ---: |", *rows]


def bypass_pairs(results: list[SystemResult]) -> list[tuple[SystemResult, SystemResult]]:
    """Each page-cache-bypassing loader's row through modelfs with its row on s5cmd-downloaded files."""
    by = {r.key: r for r in results}
    return [(r, by[r.key + LOCAL_SUFFIX]) for r in results if r.key + LOCAL_SUFFIX in by]


def bypass_ratios(results: list[SystemResult]) -> list[dict[str, Any]]:
    """For results.json: loader through modelfs / the same loader on the downloaded files, cold and warm."""
    out = []
    for m, loc in bypass_pairs(results):
        row: dict[str, Any] = {"loader": m.key, "modelfs": m.name, "local": loc.name}
        for phase in ("cold", "warm"):
            a, b = m.median(phase), loc.median(phase)
            row[phase] = {"modelfs_s": a, "local_s": b, "ratio": _ratio(a, b)}
        out.append(row)
    return out


def bypass_table(results: list[SystemResult]) -> list[str]:
    """The ratio these rows exist for: a loader that skips the page cache, through modelfs against itself on
    files s5cmd downloaded first (cold: the download inside the timing; warm: the files, page cache dropped)."""
    rows = []
    for m, loc in bypass_pairs(results):
        mc, lc, mw, lw = m.median("cold"), loc.median("cold"), m.median("warm"), loc.median("warm")
        cold, warm = _ratio(mc, lc), _ratio(mw, lw)
        rows.append(f"| {m.name.removesuffix(THROUGH_MODELFS)} | {_secs(mc)} | {_secs(lc)} | "
                    f"{'—' if cold is None else f'{cold:.2f}x'} | {_secs(mw)} | {_secs(lw)} | "
                    f"{'—' if warm is None else f'{warm:.2f}x'} |")
    if not rows:
        return []
    return ["", "Loaders that bypass the page cache (O_DIRECT), through modelfs / the same loader on s5cmd-downloaded "
            "local files (medians; below 1 is modelfs faster):", "",
            "| loader (reader) | modelfs cold | s5cmd download, then the loader | ratio | modelfs warm | "
            "the loader on the downloaded files, page cache dropped | ratio |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |", *rows]


def _load(facts: dict[str, Any]) -> str:
    """1-minute load average at start and end: on 2 cores, anything else running shows in every number."""
    start, end = facts.get("loadavg_start"), facts.get("loadavg_end")
    return f"{start[0]:.1f} at start" + (f", {end[0]:.1f} at end" if end else "") if start else "?"


def _row(r: SystemResult) -> str:
    if r.error and not any(r.series(p) for p in PHASES):
        return f"| {r.name} | failed | failed | failed |"
    return f"| {r.name}{' (partial)' if r.error else ''} | {_cell(r.cold)} | {_cell(r.warm)} | {_cell(r.hot)} |"


def markdown(results: list[SystemResult], cks: list[Check], facts: dict[str, Any]) -> str:
    size = facts["checkpoint_bytes"]
    lines = [
        f"Checkpoint: {size / 2**30:.2f} GiB, 4 safetensors shards, served by SeaweedFS S3 on loopback. "
        f"Load = `load_file` + clone of every tensor in a fresh process. Seconds, median of "
        f"{facts['reps']} (min-max); lower is better. {facts['nproc']} cores, {facts['mem_gib']} GiB, "
        f"kernel {facts['kernel']}, {facts['date']}, load average {_load(facts)}.",
        "",
        "| system | cold | warm | hot |",
        "| --- | ---: | ---: | ---: |",
    ]
    bypassing = {r.key for pair in bypass_pairs(results) for r in pair}
    lines += [_row(r) for r in results if r.key not in bypassing]
    four = next((r for r in results if r.key == "modelfs"), None)
    walls = four.extra.get("four_process_wall_s", []) if four else []
    if walls:
        lines.append(f"| modelfs cold, 4 processes at once (wall) | {_cell(walls)} | — | — |")
    keyed = four.extra.get("cold_key_order_s", []) if four else []
    if keyed:
        lines.append(f"| modelfs cold, `safe_open` in key-name order (vLLM-style) | {_cell(keyed)} | — | — |")
    lines += [_row(r) for r in results if r.key in bypassing]  # after modelfs's own rows, as they ran
    lines += [
        "",
        "cold: empty cache, fresh mount, page cache dropped (s5cmd: download into an empty directory, then load). "
        "warm: cache kept, remounted, page cache dropped (local disk: its files with the page cache dropped). "
        "hot: the same mount again, page cache kept." + (
            " The rows named for a loader (Run:ai Model Streamer on files, fastsafetensors) use that loader instead "
            "of `load_file`, with the reader it was seen to use in brackets; their local-copy row's cold is s5cmd's "
            "download then the loader, its warm the downloaded files with the page cache dropped." if bypassing
            else ""),
    ]
    lines += bypass_table(results)
    if cks:
        lines += ["", "| modelfs target | modelfs | reference | ratio | target | met |",
                  "| --- | ---: | ---: | ---: | ---: | :---: |"]
        for c in cks:
            met = "—" if c.met is None else ("yes" if c.met else "**NO**")
            lines.append(f"| {c.what} | {c.measured} | {c.reference} | {c.shown_ratio()} | {c.target} | {met} |")
    info: list[str] = []
    under_bypass: list[str] = []
    through = {m.key for m, _ in bypass_pairs(results)}
    for r in results:
        rss = [x for x in r.extra.get("cold_peak_rss_bytes", []) if x]
        if rss and r.key != "modelfs":
            (under_bypass if r.key in through else info).append(f"{r.name} {max(rss) / 2**20:.0f} MiB")
    if info:
        lines += ["", "Peers' daemon peak RSS during a cold load (for context): " + ", ".join(info) + "."]
    if under_bypass:
        lines += ["", "modelfs's peak RSS during a cold load by a page-cache-bypassing loader (max of reps): "
                  + ", ".join(under_bypass) + "."]
    lines += cpu_table(results, size)
    lines += ["", "How each system ran (URL: the SeaweedFS endpoint; WORK: the scratch directory). Every load "
              "must return every tensor and byte; the first load of each system is also compared, tensor by "
              "tensor (`torch.equal`), with the source:", ""]
    for r in results:
        checked = f"{r.verified_tensors} tensors equal" if r.verified_tensors else "not verified"
        lines.append(f"- {r.name}: `{r.command or '—'}` ({checked})")
    failed = [r for r in results if r.error]
    for r in failed:
        lines += ["", f"**{r.name} failed:** `{r.error.splitlines()[0][:300] if r.error else ''}`"]
    return "\n".join(lines) + "\n"


def chart(results: list[SystemResult], path: Path, title: str) -> None:
    """Grouped bars, x = system, one bar per phase median; Agg so it runs headless."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bypassing = {r.key for pair in bypass_pairs(results) for r in pair}
    measured = [r for r in results if any(r.series(p) for p in PHASES)]
    shown = [r for r in measured if r.key not in bypassing]
    walls = next((r.extra.get("four_process_wall_s", []) for r in results if r.key == "modelfs"), [])
    if walls:
        shown.append(SystemResult("modelfs4", "modelfs, 4 processes\n(cold, wall)", cold=list(walls)))
    shown += [r for r in measured if r.key in bypassing]  # in the table's order
    fig, ax = plt.subplots(figsize=(max(10.0, 1.3 * len(shown) + 1.0), 4.8))
    width = 0.27
    for k, phase in enumerate(PHASES):
        xs = [i + (k - 1) * width for i in range(len(shown))]
        vals = [r.median(phase) for r in shown]
        bars = ax.bar([x for x, v in zip(xs, vals, strict=True) if v is not None],
                      [v for v in vals if v is not None], width, label=phase)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    labels = ["\n".join(textwrap.fill(line, 18) for line in r.name.splitlines()) for r in shown]
    ax.set_xticks(range(len(shown)), labels, fontsize=7)
    ax.set_ylabel("seconds to load every tensor (median)")
    ax.set_title(title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
