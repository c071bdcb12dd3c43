"""The docs a newcomer reads hold: README.md stays short, every relative link in README.md and docs/*.md lands on a
file (and a heading, where it names one), every repository path and `moe.` name they mention exists, and every shell
command in their ```bash blocks is either checked here or marked as one this suite can not run
(docs/contributing.md, "Commands in the docs", defines the marks).

Checked means: a `scripts/X.py` it names exists; a Hydra entry point's overrides compose with the real conf/ (each
value of a `-m` sweep in turn), so a misspelled key, group or option, or a removed config, fails here; an argparse
script's or `python -m` module's `--flags` are ones it defines; a `pip install` names extras pyproject.toml has and
the torch pin .ci/run installs; the README's test command is CI's. Commands that need a GPU or a cluster must say so
even where their config composes."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser

from moe.lifecycle.growth import GROWERS
from moe.model.kinds import KINDS
from tests.helpers import ROOT

README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
README_LIMIT = 12 * 1024  # bytes (issue 26: at most 12 KB)

# A comment on a command's last line, or on the comment lines right above it, that holds one of these marks it as
# one the suite does not run. Hardware marks are required where the command needs that hardware (HARDWARE below).
MARKS = ("needs a GPU", "needs a cluster", "needs a network", "by hand")
HARDWARE = {  # a pattern in a command -> the marks that may stand for it
    r"\btrainer=(ddp|fsdp|gpu)\b": ("needs a GPU", "needs a cluster"),
    r"--device[ =]cuda": ("needs a GPU",),
    r"^(srun|torchrun|sbatch)\b|hydra/launcher=slurm": ("needs a cluster",),
}
SHELL = {".", "source", "export", "cd", "echo", "mkdir"}  # setup and plumbing: CI's .ci/run does the same
LINT = ["ruff", "check", "moe", "tests", "scripts"]  # run by test_the_lint_command_passes


# -- reading the pages ---------------------------------------------------------------------------------------------


def fences(text: str, language: str) -> list[str]:
    """The bodies of the ```language blocks of a markdown text."""
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


def split_comment(line: str) -> tuple[str, str]:
    """A shell line cut at its first `#` outside quotes that starts a word: (code, comment)."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1 :].strip()
    return line.rstrip(), ""


@dataclass(frozen=True)
class Command:
    page: str
    text: str  # the command, continuation lines joined
    comments: str  # its trailing comment and the comment lines right above it

    @property
    def marks(self) -> list[str]:
        return [mark for mark in MARKS if mark in self.comments]


def commands(page: Path) -> list[Command]:
    """Every shell command of the page's ```bash blocks, split at `&&`, `||`, `|` and `;`."""
    found = []
    for block in fences(page.read_text(), "bash"):
        above: list[str] = []
        pending = ""
        for line in block.splitlines():
            code, comment = split_comment(line)
            if not code.strip() and not pending:  # a comment line (or a blank one, which ends a comment run)
                above = [*above, comment] if comment else []
                continue
            if code.endswith("\\"):
                pending += code[:-1] + " "
                above.append(comment)
                continue
            whole, pending = pending + code, ""
            for part in re.split(r"\s(?:&&|\|\||\||;)\s", whole):
                found.append(Command(page.name, part.strip(), " ".join([*above, comment])))
            above = []
    return found


ALL = [c for page in PAGES for c in commands(page)]


def words(command: str) -> list[str]:
    """The command's words, leading `NAME=value` environment assignments left out."""
    tokens = shlex.split(command)
    while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", tokens[0]):
        tokens = tokens[1:]
    return tokens


# -- README ----------------------------------------------------------------------------------------------------------


def test_readme_is_short():
    size = len(README.read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes, over {README_LIMIT}: move detail into docs/"


def test_readme_test_command_is_what_ci_runs():
    """The README's test command sets up what .ci/run sets up, in the same order, and runs what it runs."""
    ci = (ROOT / ".ci" / "run").read_text()
    ci_steps = [line.replace(" -q", "") for line in ci.splitlines() if line and not line.startswith(("#", "set "))]
    readme_steps = next(
        [c.text for c in commands(README) if c.text in chunk]
        for chunk in fences(README.read_text(), "bash")
        if chunk.rstrip().endswith("python -m pytest")
    )
    wanted = ["python3 -m venv .venv", ". .venv/bin/activate", "pip install torch==2.13.0", 'pip install -e ".[test]"']
    assert readme_steps[:4] == wanted, f"README.md's test command begins {readme_steps[:4]}"
    assert [s for s in ci_steps if s in wanted] == wanted, f".ci/run no longer runs {wanted} in order"
    assert words(readme_steps[-1]) == ["python", "-m", "pytest"] == words(ci_steps[-1]), "the test runs differ"


# -- links ---------------------------------------------------------------------------------------------------------

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for the page's headings (outside code blocks)."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)
    seen: dict[str, int] = {}
    out = set()
    for title in re.findall(r"^#+ (.+)$", text, flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        out.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return out


def links(page: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]  # relative ones: no scheme


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_the_link_check_catches_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Top\n\n[ok](#top) [gone](missing.md) [bad](page.md#nowhere)\n```bash\n[x](in-code.md)\n```\n")
    assert links(page) == ["#top", "missing.md", "page.md#nowhere"]
    assert anchors(page) == {"top"}


# -- names of files and modules -----------------------------------------------------------------------------------

# A repository path in prose or code (`conf/expert/pathway.yaml`, `moe/model/bridge.py`, `tests/test_exactness.py`),
# not a pattern or a placeholder (`scripts/bench_*.py`, `conf/<name>.yaml`), and a dotted name in the package
# (`moe.lifecycle.Lifecycle`), not a format tag (`moe.bundle/2`).
PATH = re.compile(r"(?<![\w./-])((?:moe|scripts|tests|conf|notebooks|docs)/[\w./-]*\w)(?![\w*<{$])")
DOTTED = re.compile(r"(?<![\w./-])(moe(?:\.\w+)+)(?![\w/])")


def missing_name(dotted: str) -> str | None:
    """Why `moe.a.b.Name` names nothing in this checkout (None when it does): each module part must be a package or
    a module, and the first part after them a name that module defines or imports (what follows is not checked)."""
    parts, here = dotted.split("."), ROOT
    for i, part in enumerate(parts):
        source = here / "__init__.py" if here.is_dir() else here
        if here.is_dir() and (here / part).is_dir():
            here = here / part
        elif here.is_dir() and (here / f"{part}.py").is_file():
            here = here / f"{part}.py"
        elif i > 0 and source.is_file() and re.search(rf"\b{part}\b", source.read_text()):
            return None
        else:
            return f"{'.'.join(parts[: i + 1])} is not in {here.relative_to(ROOT)}"
    return None


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_file_and_module_named_exists(page):
    """A file moved or a module renamed fails here, naming the page that still says the old name."""
    text = page.read_text()
    gone = [p for p in sorted(set(PATH.findall(text))) if not any((ROOT / q).exists() for q in (p, f"{p}.py"))]
    problems = [f"{path}: no such file or folder" for path in gone]  # `moe/bench` names moe/bench.py
    problems += [why for name in sorted(set(DOTTED.findall(text))) if (why := missing_name(name))]
    assert not problems, f"{page.name}: " + "; ".join(problems)


def test_the_name_check_catches_a_moved_module():
    assert missing_name("moe.lifecycle.Lifecycle") is None and missing_name("moe.serving") is None
    assert missing_name("moe.lifecycle.NoSuchThing") and missing_name("moe.nowhere.Thing")
    assert PATH.findall("`scripts/bench_*.py`, `conf/<name>.yaml` and conf/expert/pathway.yaml.") == [
        "conf/expert/pathway.yaml"
    ]
    assert DOTTED.findall("format `moe.bundle/2`, `moe.lifecycle.Lifecycle`") == ["moe.lifecycle.Lifecycle"]


# -- commands ------------------------------------------------------------------------------------------------------


def compose_all(config_name: str, overrides: list[str]) -> None:
    """Compose conf/<config_name>.yaml with the overrides; each value of a sweep in turn, the others at their first."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    sweeps = {o.input_line: list(o.sweep_string_iterator()) for o in parsed if o.is_sweep_override()}
    first = [
        f"{o.get_key_element()}={sweeps[o.input_line][0]}" if o.input_line in sweeps else o.input_line for o in parsed
    ]
    runs = [first] + [
        [f"{o.get_key_element()}={value}" if o.input_line == line else x for o, x in zip(parsed, first, strict=True)]
        for line, values in sweeps.items()
        for value in values[1:]
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for run in runs:
            compose(config_name, overrides=run, return_hydra_config=True)


def check_flags(source: Path, flags: list[str]) -> list[str]:
    text = source.read_text()
    return [f"{flag} is not an option of {source.relative_to(ROOT)}" for flag in flags if f'"{flag}"' not in text]


def check(command: Command) -> list[str]:
    """What is wrong with a command ([] when it is checked and right); raises `Unchecked` for one no rule covers."""
    tokens = words(command.text)
    problems = [f"{t} does not exist" for t in tokens if re.match(r"scripts/", t) and not (ROOT / t).exists()]
    script = next((i for i, t in enumerate(tokens) if re.fullmatch(r"scripts/\w+\.py", t)), None)
    flags = [t.split("=", 1)[0] for t in tokens if t.startswith("--")]
    if script is not None:
        path = ROOT / tokens[script]
        if not path.exists():
            return problems
        hydra = re.search(r'@hydra\.main\(.*config_name="(\w+)"', path.read_text())
        if not hydra:
            return problems + check_flags(path, flags)
        args = [t for t in tokens[script + 1 :] if t not in ("-m", "--multirun")]
        try:
            compose_all(hydra.group(1), args)
        except Exception as error:  # Hydra's composition errors name the key, group or option
            problems.append(f"conf/{hydra.group(1)}.yaml does not compose with {args}: {error}")
        return problems
    if tokens[:1] in (["python"], ["python3"]) and tokens[1:2] == ["-m"]:
        module = tokens[2]
        if module == "venv":
            return problems
        if module == "pytest":  # CI runs the suite; a `-m` expression may name only declared markers
            expression = tokens[tokens.index("-m", 3) + 1] if "-m" in tokens[3:] else ""
            known = {"not", "and", "or", *re.findall(r'^\s*"(\w+):', (ROOT / "pyproject.toml").read_text(), re.M)}
            return problems + [f"no pytest marker {w!r}" for w in re.findall(r"\w+", expression) if w not in known]
        base = ROOT / module.replace(".", "/")
        source = next((p for p in (base.with_suffix(".py"), base / "__main__.py") if p.exists()), None)
        if source is None:
            return [*problems, f"no module {module} in this checkout"]
        return problems + check_flags(source, flags)
    if tokens[:2] == ["pip", "install"]:
        extras = pyproject_extras()
        ci = (ROOT / ".ci" / "run").read_text()
        for t in tokens[2:]:
            if match := re.fullmatch(r"\.\[([\w,-]+)\]", t):
                problems += [f"pyproject.toml has no extra {e}" for e in match.group(1).split(",") if e not in extras]
            elif t.startswith("torch=="):
                problems += [] if f"pip install -q {t}\n" in ci else [f".ci/run does not install {t}"]
        return problems
    if tokens[:1] and tokens[0] in SHELL or tokens == LINT:
        return problems
    raise Unchecked(command.text)


def pyproject_extras() -> set[str]:
    """The names of pyproject.toml's `[project.optional-dependencies]` (read by hand: tomllib needs Python 3.11)."""
    section = (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([\w-]+) = \[", section, flags=re.MULTILINE))


class Unchecked(Exception):
    """A command no rule of `check` covers."""


@pytest.mark.parametrize("command", ALL, ids=lambda c: f"{c.page}:{c.text[:60]}")
def test_every_command_is_checked_or_marked(command):
    for pattern, allowed in HARDWARE.items():
        if re.search(pattern, command.text):
            assert set(allowed) & set(command.marks), f"`{command.text}` needs a `# {allowed[0]}` mark"
    try:
        problems = check(command)
    except Unchecked:
        assert command.marks, (
            f"`{command.text}` is neither checked by tests/test_docs.py nor marked with one of {MARKS}"
        )
        return
    assert not problems, "\n".join(problems)


def test_the_command_check_catches_mistakes():
    """A misspelled key, a missing option, an unknown flag, extra or script: each named."""
    bad = [
        "python scripts/train.py experiment=clinc150 expert.rankk=16",
        "python scripts/train.py -m gate=prototype,swich",
        "python scripts/grow.py store_dir=x tenant.name=acme routing=statistcs",
        "python scripts/collect_runs.py DIR --metrc val/acc_routed",
        "python -m moe.serving outputs/bundle --budget-gb 1",
        'pip install -e ".[servr]"',
        'python -m pytest -m "not slw"',
        "python scripts/no_such_script.py a=1",
    ]
    for text in bad:
        assert check(Command("t", text, "")), f"`{text}` passed the check"
    with pytest.raises(Unchecked):
        check(Command("t", "curl -s localhost:8000/health", ""))
    assert not check(Command("t", "python scripts/train.py -m experiment=clinc150 gate=prototype,switch seed=0,1", ""))


def test_commands_are_found_in_blocks(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "```bash\n# by hand: a comment above\nA=1 python x.py \\\n  b=2   # trailing\necho x | cat && ls\n```\n"
    )
    found = commands(page)
    assert [c.text for c in found] == ["A=1 python x.py    b=2", "echo x", "cat", "ls"]
    assert found[0].marks == ["by hand"] and not found[1].marks
    assert words(found[0].text) == ["python", "x.py", "b=2"]


def test_the_lint_command_passes():
    """The docs' lint command is one the suite runs (the test extra installs ruff)."""
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    done = subprocess.run([ruff, *LINT[1:]], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(LINT)} fails:\n{done.stdout[-4000:]}{done.stderr[-2000:]}"


# -- the expert-kind guide -----------------------------------------------------------------------------------------

GUIDE = ROOT / "docs" / "adding-an-expert-kind.md"
TODO = "TODO(lead)"


def test_the_expert_kind_guide_runs():
    """The guide's ```python blocks run, in order, in one namespace: its worked kind must work, and it leaves the
    kinds' registries as it found them."""
    blocks = fences(GUIDE.read_text(), "python")
    assert blocks, f"{GUIDE.name} has no python block"
    if any(TODO in block for block in blocks):
        pytest.skip(f"{GUIDE.name}'s code is still a {TODO} placeholder: the ExpertKind interface is being built")
    kinds, growers, threads = dict(KINDS), dict(GROWERS), torch.get_num_threads()
    namespace: dict = {"__name__": "expert_kind_guide"}
    torch.set_num_threads(1)  # its tiny training steps: on a busy machine, more threads only wait for each other
    try:
        for block in blocks:
            exec(compile(block, str(GUIDE), "exec"), namespace)
        assert kinds == KINDS and growers == GROWERS, f"{GUIDE.name} leaves its kind registered"
    finally:  # module dicts: a failed run must not leave its kind behind for the other tests
        KINDS.clear(), KINDS.update(kinds), GROWERS.clear(), GROWERS.update(growers)
        torch.set_num_threads(threads)


def test_every_page_is_reachable_from_the_readme():
    text = README.read_text()
    unlinked = [p.name for p in DOCS if f"docs/{p.name}" not in text]
    assert not unlinked, f"README.md links no page {unlinked}"


def test_pages_have_bash_blocks_to_check():
    """The command check reads something: a change to the fences' syntax would otherwise pass every page."""
    assert len(ALL) > 40 and any(c.page == "README.md" for c in ALL)
