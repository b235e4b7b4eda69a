"""The documentation agrees with the code and the packaging: Python and torch floors, README's
set-up commands, links, printed signatures, the test names it cites and the public docstrings.

Reads files and package metadata only: no network, no subprocess.
"""
from __future__ import annotations

import ast
import importlib
import importlib.metadata
import inspect
import re
import shlex
import sys
import tomllib
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

import syncbn

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ("README.md", "BENCHMARKS.md", "launch/README.md")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PYTHONS = [Version(f"3.{minor}") for minor in range(6, 30)]


def section(text: str, heading: str) -> str:
    """The text of the Markdown section ``heading`` (up to the next heading of its level or
    above; ``#`` lines inside fenced code are no headings)."""
    level = len(heading) - len(heading.lstrip("#"))
    lines = text.splitlines(keepends=True)
    start = lines.index(heading + "\n")
    fenced = False
    for end in range(start + 1, len(lines)):
        fenced ^= lines[end].startswith("```")
        if not fenced and re.match(r"#{1,%d} " % level, lines[end]):
            break
    else:
        end = len(lines)
    return "".join(lines[start:end])


def setup_section() -> str:
    return section(README.read_text(), "## Set-up: two commands")


def readme_commands() -> List[str]:
    """The two set-up commands, as README prints them."""
    return re.findall(r"^pip install .*$", setup_section().split("```bash")[1].split("```")[0],
                      re.M)


def python_floor(specifiers: List[SpecifierSet]) -> Version:
    """The oldest Python minor version every one of ``specifiers`` admits."""
    return next(v for v in PYTHONS if all(s.contains(v) for s in specifiers))


def _pins(command: str) -> Dict[str, str]:
    """``name -> version`` of the ``name==version`` requirements of a pip command."""
    return {Requirement(word).name: str(next(iter(Requirement(word).specifier)).version)
            for word in shlex.split(command) if "==" in word}


def _extras(command: str) -> List[str]:
    return [e.strip() for word in shlex.split(command) if word.startswith(".[")
            for e in word[2:-1].split(",")]


def _pinned_requirements(command: str) -> List[Requirement]:
    """The ``==`` requirements a README command installs: its own and its extras' (whose
    markers apply here)."""
    pinned = [Requirement(word) for word in shlex.split(command) if "==" in word]
    for extra in _extras(command):
        for line in PYPROJECT["project"]["optional-dependencies"][extra]:
            requirement = Requirement(line)
            if "==" in str(requirement.specifier) and (
                    requirement.marker is None or requirement.marker.evaluate()):
                pinned.append(requirement)
    return pinned


def _installed_requires_python(requirement: Requirement) -> SpecifierSet:
    """Requires-Python of the installed distribution, which must be the pinned version."""
    try:
        metadata = importlib.metadata.metadata(requirement.name)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{requirement.name} is not installed: its Requires-Python cannot be read")
    if not requirement.specifier.contains(metadata["Version"]):
        pytest.skip(f"{requirement.name} {metadata['Version']} is installed, not {requirement}")
    return SpecifierSet(metadata.get("Requires-Python") or "")


def readme_python_floors() -> Tuple[Version, Version]:
    """(the library's and the demo's floor, the test suite's floor), as README states them."""
    match = re.search(r"\(Python (\d+\.\d+)\+, and (\d+\.\d+)\+ for the\s+test suite",
                      setup_section())
    assert match, "README's set-up no longer states the Python floors where this test reads them"
    return Version(match.group(1)), Version(match.group(2))


def test_readme_python_floors_are_those_of_requires_python_and_the_pinned_packages():
    """README's floors are the real ones: requires-python for the library, and the
    Requires-Python of every package the two commands pin (torch; the test extra's triton)."""
    library, tests = readme_python_floors()
    requires = SpecifierSet(PYPROJECT["project"]["requires-python"])
    assert python_floor([requires]) == library
    demo, test = readme_commands()
    assert python_floor([requires] + [_installed_requires_python(r)
                                      for r in _pinned_requirements(demo)]) == library
    assert python_floor([requires] + [_installed_requires_python(r)
                                      for r in _pinned_requirements(test)]) == tests


def test_torch_floor_is_the_version_readme_pins_and_ci_runs_readme_s_test_command():
    pins = {_pins(command)["torch"] for command in readme_commands()}
    pins |= set(re.findall(r'"torch==([\d.]+)"', setup_section()))
    assert len(pins) == 1, pins  # the demo, the test and the CPU-index commands agree
    torch_req = next(Requirement(r) for r in PYPROJECT["project"]["dependencies"]
                     if Requirement(r).name == "torch")
    floors = [s.version for s in torch_req.specifier if s.operator == ">="]
    assert floors == [".".join(pins.pop().split(".")[:2])], torch_req  # the tested release
    assert f"install the torch build you want ({floors[0]} or later)" in setup_section()
    assert readme_commands()[1] in (ROOT / ".ci" / "run").read_text()


def test_library_source_parses_with_the_grammar_of_its_oldest_python():
    floor = python_floor([SpecifierSet(PYPROJECT["project"]["requires-python"])])
    for path in sorted((ROOT / "syncbn").rglob("*.py")):
        ast.parse(path.read_text(), str(path), feature_version=(floor.major, floor.minor))


def test_readme_names_every_package_the_test_extra_installs():
    names = {Requirement(r).name for r in PYPROJECT["project"]["optional-dependencies"]["test"]}
    sentence = re.search(r"installs the `test` extra:(.*?)\.\s", setup_section(), re.S).group(1)
    named = set(re.findall(r"[a-z][a-z0-9-]+", sentence))
    assert names <= named, names - named


def test_slow_runs_are_left_out_by_default_and_selected_by_m_slow():
    options = PYPROJECT["tool"]["pytest"]["ini_options"]
    words = shlex.split(options["addopts"])
    assert words[words.index("-m") + 1] == "not slow"
    assert any(m.startswith("slow:") for m in options["markers"])
    assert "`python -m pytest -q -m slow` runs them" in setup_section()


# --- links -------------------------------------------------------------------------------------

def _without_fences(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def _without_code(text: str) -> str:
    """Markdown text with fenced blocks and inline code spans blanked (they hold no links)."""
    return re.sub(r"`[^`\n]*`", "", _without_fences(text))


def github_anchors(text: str) -> set:
    """The anchors GitHub gives the headings of a Markdown text (punctuation dropped, code
    spans' text kept, spaces to hyphens, repeats numbered)."""
    anchors, seen = set(), {}
    for heading in re.findall(r"^#{1,6} (.+?)\s*$", _without_fences(text), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def links(text: str) -> Iterator[str]:
    """Targets of the inline links and images of a Markdown text."""
    for match in re.finditer(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)",
                             _without_code(text)):
        yield match.group(1)


def broken_links(document: Path) -> List[str]:
    broken = []
    for target in links(document.read_text()):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: (no network here)
            continue
        path, _, anchor = target.partition("#")
        resolved = (document.parent / path).resolve() if path else document
        if not resolved.exists():
            broken.append(f"{target}: no file {resolved.relative_to(ROOT) if ROOT in resolved.parents else resolved}")
        elif anchor and resolved.suffix == ".md" and anchor not in github_anchors(resolved.read_text()):
            broken.append(f"{target}: no heading with anchor #{anchor}")
    return broken


@pytest.mark.parametrize("name", DOCS)
def test_every_relative_link_and_image_resolves(name):
    assert broken_links(ROOT / name) == []


def test_link_check_catches_a_missing_file_and_a_missing_anchor(tmp_path):
    (tmp_path / "there.png").write_bytes(b"")
    (tmp_path / "other.md").write_text("# Other\n\n## A `code` heading, twice\n\n## A `code` heading, twice\n")
    page = tmp_path / "page.md"
    page.write_text("# Page\n\n![ok](there.png) [ok](other.md#a-code-heading-twice-1) [ok](#page)\n"
                    "![gone](figures/there.png) [gone](other.md#nowhere) [gone](#elsewhere)\n"
                    "```\n[not a link](nowhere.md)\n```\n[web](https://example.invalid/x)\n")
    assert [b.split(":")[0] for b in broken_links(page)] == [
        "figures/there.png", "other.md#nowhere", "#elsewhere"]


# --- what README prints of the API ---------------------------------------------------------------

# README's printed signatures (in the sections this file's owner keeps), and what they describe.
PRINTED_SIGNATURES = {
    "syncbn.init_distributed": syncbn.init_distributed,
    "syncbn.SyncBatchNorm": syncbn.SyncBatchNorm,
    "syncbn.SyncBatchNormAct": syncbn.SyncBatchNormAct,
    "syncbn.functional.sync_batch_norm": syncbn.functional.sync_batch_norm,
}


def printed_signature(text: str, name: str) -> List[Tuple[str, Optional[str], bool]]:
    """(parameter, default as printed or None, keyword-only) of README's ``name(...)``; a
    printed ``...`` stands for parameters left out."""
    match = re.search(r"`%s\(([^`]*)\)`" % re.escape(name), text)
    assert match, f"README no longer prints the signature of {name}"
    out, keyword_only = [], False
    for part in (p.strip() for p in match.group(1).replace("\n", " ").split(",")):
        if part == "*":
            keyword_only = True
            continue
        if part == "...":
            continue
        parameter, _, default = part.partition("=")
        out.append((parameter.strip(), default.strip() or None, keyword_only))
    return out


@pytest.mark.parametrize("name", PRINTED_SIGNATURES)
def test_readme_prints_signatures_as_the_code_has_them(name):
    """Every printed parameter exists, in the code's order, with the printed default, and is
    keyword-only exactly when README prints it after ``*``."""
    real = inspect.signature(PRINTED_SIGNATURES[name]).parameters
    printed = printed_signature(README.read_text(), name)
    assert [p for p, _, _ in printed] == [p for p in real if p in {q for q, _, _ in printed}]
    for parameter, default, keyword_only in printed:
        assert parameter in real, parameter
        assert (real[parameter].kind is inspect.Parameter.KEYWORD_ONLY) == keyword_only, parameter
        if default is not None:
            assert ast.literal_eval(default) == real[parameter].default, parameter


def test_documented_exit_grace_default_is_the_launcher_s():
    """README and launch/README.md give syncbn-launch's --exit-grace default in seconds."""
    import syncbn.launch

    default = syncbn.launch._parser().parse_args(["--nprocs", "2", "train.py"]).exit_grace
    for name in ("README.md", "launch/README.md"):
        text = " ".join((ROOT / name).read_text().split())
        documented = re.findall(r"`--exit-grace` seconds later \(default (\d+(?:\.\d+)?)\)", text)
        assert documented and {float(d) for d in documented} == {default}, (name, documented, default)


def test_project_layout_names_paths_that_exist():
    table = section(README.read_text(), "## Project layout")
    paths = [p for row in re.findall(r"^\| (`.*?) \|", table, re.M) for p in re.findall(r"`([^`]+)`", row)]
    assert len(paths) >= 10 and [p for p in paths if not (ROOT / p).exists()] == []


def test_tests_the_docs_name_exist():
    """Every test file and test function README or launch/README.md names in backticks."""
    tests = ROOT / "tests"
    functions = {node.name for path in tests.glob("test_*.py")
                 for node in ast.walk(ast.parse(path.read_text()))
                 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    for name in ("README.md", "launch/README.md"):
        text = (ROOT / name).read_text()
        for cited in re.findall(r"`(?:tests/)?(test_\w+\.py)`", text):
            assert (tests / cited).exists(), f"{name} cites {cited}"
        for cited in re.findall(r"`(test_\w+)`", text):
            assert cited in functions, f"{name} cites {cited}"


# --- docstrings --------------------------------------------------------------------------------

PUBLIC_MODULES = ("syncbn", "syncbn.comm", "syncbn.functional", "syncbn.guard",
                  "syncbn.distributed", "syncbn.data", "syncbn.testing", "syncbn.launch",
                  "syncbn.convert", "syncbn.groups", "syncbn.precise_bn", "syncbn.activated",
                  "syncbn.module")


def public_classes() -> Iterator[Tuple[str, type]]:
    """Every class in the ``__all__`` of syncbn and its public modules (syncbn.lightning too,
    where Lightning imports)."""
    modules = [importlib.import_module(name) for name in PUBLIC_MODULES]
    try:
        import torchvision_shim  # noqa: F401  (Lightning imports torchvision)

        modules.append(importlib.import_module("syncbn.lightning"))
    except ImportError:
        pass
    for module in modules:
        for name in module.__all__:
            value = getattr(module, name)
            if inspect.isclass(value):
                yield f"{module.__name__}.{name}", value


def test_every_public_class_has_a_docstring_of_its_own():
    names = [name for name, _ in public_classes()]
    assert "syncbn.SingleProcessCommunicator" in names and "syncbn.testing.RankPool" in names
    missing = [name for name, cls in public_classes()
               if len((cls.__dict__.get("__doc__") or "").strip()) < 20]
    assert missing == []


def test_package_docstring_is_a_one_page_overview_of_the_public_api():
    doc = syncbn.__doc__
    assert len(doc.splitlines()) <= 80
    words = set(re.findall(r"\w+", doc))
    assert [name for name in syncbn.__all__ if name not in words] == []
    for module in ("syncbn.testing", "syncbn.data", "syncbn.lightning", "syncbn-launch"):
        assert module in doc, module
