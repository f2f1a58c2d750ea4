"""What users read: the math page and its anchors, and README statements generated from code.

Users get the repository (README, docs/, configs/, examples/) and the package, never the project's
internal design notes, so nothing they read may send them there.
"""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MATH = ROOT / "docs" / "math.md"

# The sections the README, reports and docstrings rely on (docs/math.md#<anchor>).
MATH_SECTIONS = (
    "policy",
    "per-sequence-statistics",
    "true-entropy-change-snis",
    "reliability-diagnostics",
    "first-order",
    "rl-losses",
    "adamw-step",
    "directions-and-eta",
    "replaying-a-recorded-step",
    "influence-matrices",
    "eta-sweep-and-trust-range",
    "fisher-kernel",
    "covariance-proxy",
    "token-influence",
    "token-level-proxies",
    "proxy-scoreboard",
)
LINK = re.compile(r"docs/math\.md#([A-Za-z0-9_-]+)")
INTERNAL = re.compile(r"\]\(#([A-Za-z0-9_-]+)\)")
FORBIDDEN = re.compile(r"DESIGN|shared/|§\s*\d")


def user_facing_files() -> list[Path]:
    """Every text file a user of the repository or the package reads (tests are for developers)."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    for folder, pattern in (("deltaH", "*.py"), ("examples", "*.py"), ("configs", "*.yaml")):
        files += sorted((ROOT / folder).rglob(pattern))
    files += sorted((ROOT / "deltaH" / "toy" / "artifacts").rglob("*.md"))
    return [f for f in files if f.is_file()]


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a markdown heading: lower case, punctuation dropped, spaces → '-'."""
    text = heading.strip().lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def math_anchors() -> set[str]:
    heads = [m.group(1) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*$", MATH.read_text(), re.M)]
    return {github_slug(h) for h in heads}


def test_slug_rule() -> None:
    assert github_slug("True entropy change (SNIS)") == "true-entropy-change-snis"
    assert github_slug("Directions and eta") == "directions-and-eta"
    assert github_slug("A.B: c, d") == "ab-c-d"


def test_math_page_has_every_section() -> None:
    missing = sorted(set(MATH_SECTIONS) - math_anchors())
    assert not missing, f"docs/math.md lacks the headings of anchors {missing}"


def test_every_math_link_points_to_a_heading() -> None:
    anchors = math_anchors()
    links: list[tuple[str, str]] = []
    for f in user_facing_files():
        links += [(str(f.relative_to(ROOT)), a) for a in LINK.findall(f.read_text(encoding="utf-8"))]
    links += [("docs/math.md", a) for a in INTERNAL.findall(MATH.read_text())]
    assert len(links) >= len(MATH_SECTIONS)  # the scan finds the links (a broken regex passes nothing)
    broken = [(where, a) for where, a in links if a not in anchors]
    assert not broken, f"links to missing docs/math.md headings: {broken}"
    used = {a for _, a in links}
    assert "influence-matrices" in used and "true-entropy-change-snis" in used


@pytest.mark.parametrize("path", user_facing_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_pointer_to_internal_design_notes(path: Path) -> None:
    """No 'DESIGN', 'shared/' or '§1.x' in what users read: they point to docs/math.md instead."""
    hits = [
        f"{i}: {line.strip()[:100]}"
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if FORBIDDEN.search(line)
    ]
    assert not hits, f"{path.relative_to(ROOT)} points to notes users do not have: {hits}"


def test_readme_links_the_math_page() -> None:
    assert "](docs/math.md)" in (ROOT / "README.md").read_text()


def test_readme_config_table_is_generated_from_the_config() -> None:
    """The README's key table is ``describe_config()`` verbatim (help texts carry the math links)."""
    from deltaH.config import describe_config

    assert describe_config() in (ROOT / "README.md").read_text(), (
        "README.md's configuration table is stale: paste deltaH.config.describe_config() over it"
    )


def test_results_schema_table_is_generated_from_the_schema() -> None:
    """docs/results-schema.md's summary.json table is ``describe_results()`` between its markers."""
    from deltaH.io.schema import BEGIN, END, describe_results

    text = (ROOT / "docs" / "results-schema.md").read_text(encoding="utf-8")
    assert text.count(BEGIN) == 1 and text.count(END) == 1, "docs/results-schema.md lacks the markers"
    generated = text.split(BEGIN, 1)[1].split(END, 1)[0]
    assert generated == "\n" + describe_results(), (
        "docs/results-schema.md's summary.json table is stale: run "
        "python -m deltaH.io.schema --write docs/results-schema.md"
    )


# ---------------------------------------------------------------------------------------------
# output.detail: docs/results-schema.md's table is what the runner writes at each level.
# ---------------------------------------------------------------------------------------------
LEVELS = ("minimal", "standard", "detailed", "debug")


def documented_files() -> dict[str, set[str]]:
    """Level → the files docs/results-schema.md says it writes (its own row plus those above)."""
    text = (ROOT / "docs" / "results-schema.md").read_text()
    section = text.split("## Detail levels", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, set[str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        level = re.match(r"`(\w+)`", cells[0]) if len(cells) == 2 else None
        if level and level.group(1) in LEVELS:
            rows[level.group(1)] = {f for f in re.findall(r"`([^`]+)`", cells[1]) if "." in f}
    assert list(rows) == list(LEVELS), f"the detail table needs one row per level, in order: {list(rows)}"
    out, acc = {}, set()
    for lev in LEVELS:
        acc = acc | rows[lev]
        out[lev] = set(acc)
    return out


@pytest.fixture(scope="module")
def runs_by_level(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from deltaH.config import load_config
    from deltaH.runner import run

    tiny = ["eval_batch.total_sequences=8", "update_batch.n_prompts=2", "update_batch.group_size=4",
            "policy.max_new_tokens=4", "eta.grid=[1e-4]", "output.plots=false",
            "analyses.influence=true", "analyses.kernel=true"]
    base = tmp_path_factory.mktemp("levels")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # toy-sized work: one thread avoids threads waiting on a busy CPU
    try:
        return {lev: Path(run(load_config("configs/toy.yaml", [*tiny, f"output.detail={lev}"]),
                              out=base / lev, quiet=True)) for lev in LEVELS}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("level", LEVELS)
def test_detail_level_writes_exactly_the_documented_files(runs_by_level: dict[str, Path], level: str) -> None:
    run_dir = runs_by_level[level]
    written = {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()}
    documented = documented_files()[level]
    assert written - documented == set(), f"{level}: written but not documented for this level"
    assert documented - written == set(), f"{level}: documented but not written"
    manifest = json.loads((run_dir / "arrays" / "manifest.json").read_text())
    assert {f"arrays/{e['file']}" for e in manifest.values()} == {w for w in written if w.endswith(".npy")}


# ---------------------------------------------------------------------------------------------
# Setup and timing statements: the Makefile does what the README says.
# ---------------------------------------------------------------------------------------------


def _recipe(makefile: str, target: str) -> list[str]:
    """The commands of a Makefile rule: the tab-indented lines right after ``target:``."""
    out = []
    for ln in makefile.split(f"\n{target}:", 1)[1].splitlines()[1:]:
        if not ln.startswith("\t"):
            break
        out.append(ln.strip())
    return out


def test_venv_build_prints_each_step() -> None:
    """The first build takes minutes: every pip step is announced and pip's progress is not hidden."""
    recipe = _recipe((ROOT / "Makefile").read_text(), "$(VENV)/.installed")
    pips = [i for i, ln in enumerate(recipe) if "pip install" in ln]
    assert len(pips) >= 2
    for i in pips:
        assert " -q" not in recipe[i] and "--quiet" not in recipe[i], recipe[i]
        assert recipe[i - 1].startswith("@echo"), f"no progress line before: {recipe[i]}"


def test_readme_states_measured_times_and_the_machine() -> None:
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert "in a minute" not in readme  # the old promise; a first make demo takes longer
    assert "2-core AMD EPYC" in readme and "How long it takes" in readme
    # the thread setting the README's demo times depend on is the Makefile's
    assert "DEMO_THREADS ?= 1" in makefile and "OMP_NUM_THREADS=$(DEMO_THREADS)" in makefile
    assert "DEMO_THREADS=1" in readme
