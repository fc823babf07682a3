"""requirements-lock.txt holds the exact versions the tests and stored runs were made with, and installs go through it.

- The lock (made by scripts/lock.sh with pip-tools' pip-compile) pins each package once, as `name==version` and
  nothing else, and its header names its platform and its refresh command.
- Every package named in a requirements*.txt file is pinned in the lock, at a version inside each of that file's
  ranges for it (packaging's SpecifierSet; requirements-dev.txt's `-r` lines are read in their own files); the
  exact pins of requirements.txt (torch, gymnasium) and requirements-ray.txt (ray) are the lock's versions.
- Every `pip install` of a requirements file, in the README's shell blocks and in .ci/run, takes the lock as its
  constraints (`-c requirements-lock.txt`), and the README's test install is .ci/run's (less `-q`).
"""
import glob
import itertools
import os
import re
import shlex

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCK = "requirements-lock.txt"
EXACT = {"torch": "requirements.txt", "gymnasium": "requirements.txt", "ray": "requirements-ray.txt"}


def read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def requirement_files():
    """{file name: text} of every requirements*.txt of the repository but the lock."""
    names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "requirements*.txt")))
    return {name: read(name) for name in names if name != LOCK}


def requirements(text):
    """The Requirement of each line of a requirements file (comments, blank lines and `-r`/`-c` lines skipped)."""
    lines = (re.sub(r"(^|\s)#.*", "", line).strip() for line in text.split("\n"))
    return [Requirement(line) for line in lines if line and not line.startswith("-")]


def lock_pins(text):
    """({canonical name: Version} of the lock's pins, problems): pip-compile's `# via` lines are skipped."""
    pins, problems = {}, []
    for line in text.split("\n"):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            req = Requirement(line)
        except InvalidRequirement:
            problems.append(f"{LOCK}: {line!r} is not a requirement")
            continue
        specs = list(req.specifier)
        if len(specs) != 1 or specs[0].operator != "==" or "*" in specs[0].version or req.extras or req.marker:
            problems.append(f"{LOCK}: {line!r} is not an exact pin, name==version")
            continue
        name = canonicalize_name(req.name)
        if name in pins:
            problems.append(f"{LOCK}: {req.name} is pinned twice")
        pins[name] = Version(specs[0].version)
    return pins, problems


def lock_problems(lock_text, files):
    """Problems of the lock's text against the requirements files ({file name: text})."""
    pins, problems = lock_pins(lock_text)
    for file, text in files.items():
        for req in requirements(text):
            version = pins.get(canonicalize_name(req.name))
            if version is None:
                problems.append(f"{file}: {req.name} is not pinned in {LOCK}")
            elif not req.specifier.contains(version, prereleases=True):
                problems.append(f"{file}: {LOCK} pins {req.name}=={version}, outside {req.specifier}")
    return problems


def pip_installs(text):
    """The words of each `pip install` command of a shell text (comments dropped, `&&`, `||`, `;`, `|` split)."""
    commands = []
    for line in text.replace("\\\n", " ").split("\n"):
        for part in re.split(r"&&|\|\||;|\|", re.sub(r"(^|\s)#.*", "", line)):
            words = shlex.split(part)
            for i in range(len(words) - 1):
                if words[i] == "pip" and words[i + 1] == "install":
                    commands.append(words[i:])
                    break
    return commands


def install_problems(where, commands):
    """Problems of the `pip install` commands (their words) that install a requirements file without the lock."""
    problems = []
    for words in commands:
        pairs = list(itertools.pairwise(words))
        files = {b for a, b in pairs if a in ("-r", "--requirement") and b.startswith("requirements")}
        constraints = {b for a, b in pairs if a in ("-c", "--constraint")}
        if files and LOCK not in constraints and LOCK not in files:
            problems.append(f"{where}: `{' '.join(words)}` installs {', '.join(sorted(files))} without -c {LOCK}")
    return problems


def readme_installs():
    """The `pip install` commands of the README's shell blocks."""
    blocks = re.findall(r"^```(?:bash|sh|shell|console)\n(.*?)^```", read("README.md"), re.M | re.S)
    return [words for block in blocks for words in pip_installs(block)]


def test_the_lock_pins_every_requirement_inside_its_ranges():
    assert requirement_files().keys() >= {"requirements.txt", "requirements-ray.txt", "requirements-dev.txt"}
    problems = lock_problems(read(LOCK), requirement_files())
    assert not problems, "\n" + "\n".join(problems)


def test_the_lock_has_the_versions_requirements_txt_and_requirements_ray_txt_pin():
    pins, _ = lock_pins(read(LOCK))
    for name, file in EXACT.items():
        (req,) = [r for r in requirements(read(file)) if canonicalize_name(r.name) == name]
        (spec,) = req.specifier
        assert spec.operator == "==", f"{file} no longer pins {name} exactly: {req}"
        assert pins[name].public == Version(spec.version).public, f"{LOCK}: {name}=={pins[name]}, {file}: {req}"


def test_the_lock_says_what_it_is_and_how_to_refresh_it():
    header = re.match(r"(#.*\n)+", read(LOCK)).group(0)
    assert "tests and stored runs" in header and "Linux x86_64, CPython 3.11." in header, header
    assert "pip-compile" in header and "bash scripts/lock.sh" in header, header
    script = read("scripts/lock.sh")
    assert "pip-compile" in script and "pip-tools==" in script and "requirements-dev.txt" in script


def test_the_readme_and_ci_install_through_the_lock():
    ci = pip_installs(read(".ci/run"))
    readme = readme_installs()
    assert len(ci) == 1 and len([w for w in readme if "requirements-dev.txt" in w]) == 1, (ci, readme)
    assert len([w for w in readme if "requirements.txt" in w]) >= 2, readme  # the quickstart and the cluster
    problems = install_problems(".ci/run", ci) + install_problems("README.md", readme)
    assert not problems, "\n" + "\n".join(problems)
    (readme_tests,) = [w for w in readme if "requirements-dev.txt" in w]
    assert [w for w in ci[0] if w != "-q"] == readme_tests, "the README's test install is not .ci/run's"


def test_the_checks_catch_what_they_are_for():
    """A package the lock lacks, a pin outside a range or not exact, a repeat, an option line, and a pip install
    of a requirements file without the lock (in a chain, across a continuation, the lock in a comment): each found."""
    lock = "\n".join([
        "# header", "numpy==2.4.6", "    # via -r requirements.txt", "torch==2.13.0", "cma>=4", "tqdm==4.70.1",
        "TQDM==4.70.1", "--extra-index-url file:///x", "",
    ])
    files = {"requirements.txt": "torch==2.12.0  # pinned\nnumpy>=2,<3\ncma\nmatplotlib\n-r requirements-ray.txt\n"}
    assert lock_problems(lock, files) == [
        "requirements-lock.txt: 'cma>=4' is not an exact pin, name==version",
        "requirements-lock.txt: TQDM is pinned twice",
        "requirements-lock.txt: '--extra-index-url file:///x' is not a requirement",
        "requirements.txt: requirements-lock.txt pins torch==2.13.0, outside ==2.12.0",
        "requirements.txt: cma is not pinned in requirements-lock.txt",
        "requirements.txt: matplotlib is not pinned in requirements-lock.txt",
    ]
    shell = "\n".join([
        "pip install -c requirements-lock.txt -r requirements.txt && pip install -r requirements-ray.txt",
        "python -m pip install -q \\\n  -r requirements-dev.txt   # -c requirements-lock.txt",
        "pip install ale-py; pip install --constraint requirements-lock.txt --requirement requirements.txt",
    ])
    assert [p.split("` ", 1)[1] for p in install_problems("doc", pip_installs(shell))] == [
        "installs requirements-ray.txt without -c requirements-lock.txt",
        "installs requirements-dev.txt without -c requirements-lock.txt",
    ]
