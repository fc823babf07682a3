"""The docs' commands name only flags their scripts accept, and the docs' links lead somewhere.

For README.md, pretrained/README.md and benchmarks/README.md (all three must exist):

- Commands: every fenced shell block (```bash, ```sh, ```shell, ```console, or a fence without a language
  whose text contains `python train_`), and every inline code span holding `python <script>.py`, is read
  as shell: backslash continuations joined, `#` comments dropped, `&&`, `||`, `;` and `|` chains split,
  leading `VAR=value` assignments (and wrappers such as `nice`) skipped up to the `python` word. Each
  `python <script>.py ...` then names a script of the repository (run from its root), and each of its
  long flags (`--flag`, `--flag=value`) and short flags is one its parser accepts, spelled out in full
  (argparse would take an unambiguous prefix; the docs must not rely on it). No argument names a path
  outside the repository (`../...` or an absolute path).
- Where the flags come from: `train_*.py` by importing the script and calling its `build_parser()`
  (`parser._option_string_actions`). The other scripts (`benchmarks/*.py`, `pretrained/*.py`) have no
  `build_parser`: one that imports argparse is asked `python <script> --help` in a subprocess and its
  option strings are read off the help text's option lines; one that does not import argparse accepts no
  flags (it is never run: benchmarks/plot_ratios.py would redraw its figure). For benchmarks/throughput.py and
  benchmarks/time_to_solve.py the arguments after `--`, and the value of `--compare-flags`, are the
  flags of the training script they run (`--script`, else the script's default), and for
  benchmarks/ga_defaults.py the FLAGS of each `--setting NAME="FLAGS"` are train_ga.py's: those are
  checked against that script's `build_parser()` too.
- Links: every relative link and image of the file (markdown `[..](path)` and `![..](path)`, HTML
  `src="..."` and `href="..."`, outside code) exists relative to the file, inside the repository;
  `http(s)://` and `mailto:` are skipped. A `#anchor` into a markdown file (or into the file itself) must
  be the GitHub slug of one of its headings (or an explicit `id`/`name` there).
"""
import functools
import importlib
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", "pretrained/README.md", "benchmarks/README.md"]
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
CHAIN = {"&&", "||", ";", "|", "&"}
FLAG = re.compile(r"^(--[A-Za-z0-9][A-Za-z0-9_-]*)(=.*)?$|^(-[A-Za-z])$")
PYTHON = re.compile(r"^(?:.*/)?python(?:3(?:\.\d+)?)?$")
# benchmark flags whose values are flags of the training script the benchmark runs
NESTED = {"--compare-flags": lambda value: value, "--setting": lambda value: value.partition("=")[2]}


def read(doc):
    with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
        return f.read()


def fenced_blocks(text):
    """(first line number, language, body) of each fenced block; the body's lines lose the fence's indent."""
    blocks, lines, i = [], text.split("\n"), 0
    while i < len(lines):
        m = re.match(r"^(\s*)(```+|~~~+)\s*([\w+-]*)", lines[i])
        if not m:
            i += 1
            continue
        indent, fence, language = m.groups()
        start, body = i + 2, []
        i += 1
        while i < len(lines) and not re.match(rf"^\s*{re.escape(fence)}\s*$", lines[i]):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        blocks.append((start, language.lower(), "\n".join(body)))
        i += 1
    return blocks


SPAN = re.compile(r"(`+)([^`]+?)\1")  # an inline code span, possibly across lines


def without_code(text):
    """The text with fenced blocks and inline code spans blanked (line numbers kept)."""
    return SPAN.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), without_fences(text))


def strip_comment(line):
    """The line without its shell comment: a `#` that starts a word, outside quotes."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            if c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def split_words(line):
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = ""
    return list(lexer)


def shell_commands(text, first_line):
    """(line number, command text, words) of each simple command of a shell block."""
    commands, joined, joined_start = [], "", None
    for offset, raw in enumerate(text.split("\n")):
        line = strip_comment(re.sub(r"^\s*\$ ", "", raw))
        if joined_start is None:
            joined_start = first_line + offset
        if line.rstrip().endswith("\\"):
            joined += line.rstrip()[:-1] + " "
            continue
        joined += line
        if joined.strip():
            try:
                words = split_words(joined)
            except ValueError as e:
                commands.append((joined_start, joined.strip(), e))
            else:
                command = []
                for word in words + [";"]:
                    if word in CHAIN or (word and set(word) <= set(";&|")):
                        if command:
                            commands.append((joined_start, joined.strip(), command))
                        command = []
                    else:
                        command.append(word)
        joined, joined_start = "", None
    return commands


def doc_commands(doc):
    """(line, command text, words) of every command of the doc's shell blocks and inline code spans."""
    text, found = read(doc), []
    for start, language, body in fenced_blocks(text):
        if language in SHELL_LANGUAGES or (language == "" and "python train_" in body):
            found += shell_commands(body, start)
    fenceless = without_fences(text)
    for m in SPAN.finditer(fenceless):
        span = re.sub(r"\s*\n\s*", " ", m.group(2))
        if re.search(r"(^|\s)python3?\s+\S+\.py", span):
            found += shell_commands(span, fenceless.count("\n", 0, m.start()) + 1)
    return found


def without_fences(text):
    """The text with fenced blocks blanked, inline code kept (line numbers kept)."""
    lines, out, fence = text.split("\n"), [], None
    for line in lines:
        m = re.match(r"^\s*(```+|~~~+)", line)
        if fence is None and m:
            fence = m.group(1)
            out.append("")
        elif fence is not None:
            if re.match(rf"^\s*{re.escape(fence)}\s*$", line):
                fence = None
            out.append("")
        else:
            out.append(line)
    return "\n".join(out)


@functools.lru_cache(maxsize=None)
def accepted_flags(script):
    """The option strings `script` (a path from the repository root) accepts, or None: not a script here."""
    path = os.path.join(ROOT, script)
    if not os.path.isfile(path):
        return None
    name = os.path.basename(script)
    if re.fullmatch(r"train_\w+\.py", name) and os.path.dirname(script) in ("", "."):
        if ROOT not in sys.path:
            sys.path.insert(0, ROOT)
        return frozenset(importlib.import_module(name[:-3]).build_parser()._option_string_actions)
    with open(path, encoding="utf-8") as f:
        if not re.search(r"^\s*(import argparse|from argparse import)", f.read(), re.M):
            return frozenset()
    out = subprocess.run([sys.executable, path, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"{script} --help failed:\n{out.stderr}"
    invocations = [m.group(1) for m in re.finditer(r"^ {1,8}(-\S.*?)(?: {2,}.*)?$", out.stdout, re.M)]
    return frozenset(f for line in invocations for f in re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", line))


@functools.lru_cache(maxsize=None)
def default_training_script(script):
    """A benchmark's default --script (the training script it runs), read off its source, or None."""
    with open(os.path.join(ROOT, script), encoding="utf-8") as f:
        m = re.search(r"""add_argument\(\s*["']--script["']\s*,\s*default=["']([^"']+)["']""", f.read())
    return m.group(1) if m else None


def outside(path):
    return path.startswith("/") or path == ".." or path.startswith("../") or "/../" in path


def training_script(benchmark, words):
    """The training script whose flags a benchmark command passes on, or None."""
    if benchmark.endswith("ga_defaults.py"):
        return "train_ga.py"
    if "--script" in words[:-1]:
        return os.path.normpath(words[words.index("--script") + 1])
    return default_training_script(benchmark)


def check_words(script, words, where):
    """Problems of `python script words...`: not a script here, flags its parser does not accept, outside paths."""
    flags = accepted_flags(script)
    if flags is None:
        return [f"{where}: {script} is not a script of the repository"]
    problems, passed_on = [], []
    if script.startswith("benchmarks/"):
        if "--" in words:
            passed_on.append(words[words.index("--") + 1:])
            words = words[:words.index("--")]
        passed_on += [split_words(NESTED[w](v)) for w, v in zip(words, words[1:]) if w in NESTED]
    for word in words:
        m = FLAG.match(word)
        if m and (m.group(1) or m.group(3)) not in flags:
            problems.append(f"{where}: {script} does not accept {m.group(1) or m.group(3)}")
        if outside(word.partition("=")[2] if word.startswith("-") else word):
            problems.append(f"{where}: {word!r} names a path outside the repository")
    training = training_script(script, words) if passed_on else None
    for group in passed_on if training else []:
        problems += check_words(training, group, f"{where} (flags for {training})")
    return problems


def command_problems(doc, commands):
    problems = []
    for line, text, words in commands:
        where = f"{doc}:{line}: `{' '.join(text.split())}`"
        if isinstance(words, Exception):
            problems.append(f"{where}: cannot split it as shell: {words}")
            continue
        for i, word in enumerate(words[:-1]):
            if PYTHON.match(word) and words[i + 1].endswith(".py"):
                script = os.path.normpath(words[i + 1]).replace(os.sep, "/")
                problems += check_words(script, words[i + 2:], where)
                break
    return problems


@pytest.mark.parametrize("doc", DOCS)
def test_every_command_names_only_flags_its_script_accepts(doc):
    assert os.path.isfile(os.path.join(ROOT, doc)), f"{doc} does not exist"
    commands = doc_commands(doc)
    scripts = [w for _, _, words in commands if not isinstance(words, Exception) for w in words if w.endswith(".py")]
    assert scripts, f"{doc}: no `python <script>.py` command found: the reader of its blocks is broken"
    problems = command_problems(doc, commands)
    assert not problems, "\n" + "\n".join(problems)


def slug(heading):
    """GitHub's anchor of a heading: its text, lowercase, without punctuation but `-` and `_`, spaces to `-`."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@functools.lru_cache(maxsize=None)
def anchors(path):
    with open(path, encoding="utf-8") as f:
        return text_anchors(f.read())


def text_anchors(text):
    """The anchors of a markdown text: its headings' slugs (GitHub numbers repeats: -1, -2, ...), ids, names."""
    text, found, seen = without_fences(text), set(), {}
    for m in re.finditer(r"^ {0,3}#{1,6}\s+(.+?)\s*#*\s*$", text, re.M):
        base = slug(m.group(1))
        n = seen.get(base, 0)
        found.add(base if n == 0 else f"{base}-{n}")
        seen[base] = n + 1
    found.update(re.findall(r"""\b(?:id|name)=["']([^"']+)["']""", text))
    return found


def link_problems(doc, text=None):
    """Problems of the links of `doc` (a path from the repository root; `text`: its text, else read)."""
    text = read(doc) if text is None else text
    problems, own_anchors, text = [], text_anchors(text), without_code(text)
    here = os.path.dirname(os.path.join(ROOT, doc))
    patterns = [r"\]\(\s*<?([^)\s>]+)", r"""\b(?:src|href)\s*=\s*["']([^"']+)["']"""]
    for number, line in enumerate(text.split("\n"), 1):
        for pattern in patterns:
            for target in re.findall(pattern, line):
                if re.match(r"^(https?:|mailto:)", target, re.I):
                    continue
                path, _, anchor = target.partition("#")
                where = f"{doc}:{number}: link {target!r}"
                full = os.path.normpath(os.path.join(here, path))
                if not path:
                    if anchor not in own_anchors:
                        problems.append(f"{where}: no heading of {doc} has the anchor #{anchor}")
                elif os.path.relpath(full, ROOT).startswith(".."):
                    problems.append(f"{where} leads outside the repository")
                elif not os.path.exists(full):
                    problems.append(f"{where}: {os.path.relpath(full, ROOT)} does not exist")
                elif anchor and full.endswith(".md") and anchor not in anchors(full):
                    problems.append(f"{where}: no heading of {os.path.relpath(full, ROOT)} has the anchor #{anchor}")
    return problems


@pytest.mark.parametrize("doc", DOCS)
def test_every_relative_link_and_image_exists(doc):
    assert os.path.isfile(os.path.join(ROOT, doc)), f"{doc} does not exist"
    problems = link_problems(doc)
    assert not problems, "\n" + "\n".join(problems)


def test_the_checks_catch_what_they_are_for(tmp_path):
    """A bad flag anywhere in a chain, after a continuation or an assignment, as --flag=value, or after a
    benchmark's `--`, a path outside the repository, and a link or anchor that leads nowhere: each found."""
    block = "\n".join([
        "RAY_ADDRESS=auto python train_ga.py --env-id CartPole-v1 \\",
        "    --no-such-flag 3   # a comment --not-a-flag",
        "python train_cmaes.py --fresh && python train_openai_es.py --sigma=0.1 --sigmaa=0.1 | tee log",
        "python benchmarks/time_to_solve.py --seeds 1 -- --reward-goal 200 --reward-gaol 200",
        "python train_cmaes.py --from-pretrained ../shared/weights/model.npz; python train_nothing.py",
    ])
    problems = command_problems("doc.md", shell_commands(block, 1))
    assert [p.split(": ", 1)[0] + ": " + p.rsplit(": ", 1)[1] for p in problems] == [
        "doc.md:1: train_ga.py does not accept --no-such-flag",
        "doc.md:3: train_openai_es.py does not accept --sigmaa",
        "doc.md:4: train_openai_es.py does not accept --reward-gaol",
        "doc.md:5: '../shared/weights/model.npz' names a path outside the repository",
        "doc.md:5: train_nothing.py is not a script of the repository",
    ], "\n".join(problems)
    links = "\n".join([
        "[ok](../train_ga.py) ![ok](cmaes_carracing_rnn.gif) [ok](README.md#ga_cartpolenpz) [ok](#a-heading) [bad](#b)",
        '<img src="missing.gif"> [bad](README.md#no-such-heading) [out](../../x.md) `[code](skipped.md)`',
        "## A heading",
    ])
    problems = [p.split(": ", 1)[0] + ": " + p.rsplit(": ", 1)[-1] for p in link_problems("pretrained/doc.md", links)]
    assert problems == [
        "pretrained/doc.md:1: no heading of pretrained/doc.md has the anchor #b",
        "pretrained/doc.md:2: no heading of pretrained/README.md has the anchor #no-such-heading",
        "pretrained/doc.md:2: link '../../x.md' leads outside the repository",
        "pretrained/doc.md:2: pretrained/missing.gif does not exist",
    ], problems
    assert slug("The authors' AttentionAgent weights, evaluated here") == "the-authors-attentionagent-weights-evaluated-here"
    assert slug("`train_cmaes.py` and *CarRacing-v3*") == "train_cmaespy-and-carracing-v3"
    assert "ga_cartpolenpz" in anchors(os.path.join(ROOT, "pretrained", "README.md"))
