"""The shell commands of a Markdown file's fenced ```bash / ```sh / ```console / ```shell blocks.

`commands(text)` returns every command of those blocks in order, one `Command` each: backslash
continuations joined, a `$ ` prompt (console blocks) dropped, the line's trailing `# comment` kept apart,
variables assigned earlier in the same block (`M="--model ..."`) expanded, compound lines (`a && b`,
`a; b`, `a | b`) split into their commands, and leading `NAME=value` words kept as the command's
environment. `Command.kind` says which program it runs: "wanflow" (`wanflow`, `.venv/bin/wanflow`),
"wan.generate" (`python -m wan.generate` under any interpreter path, `wan-generate`, `torchrun ... -m
wan.generate`) or "other". Used by tests/test_readme_examples.py.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

SHELL_LANGUAGES = {"bash", "sh", "shell", "console", "zsh"}
_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
_ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", re.S)
_OPERATORS = {"&&", "||", ";", "|", "&"}


@dataclass(frozen=True)
class Command:
    """One command as the README writes it (`text`, variables expanded) and as words (`argv`)."""

    text: str
    argv: tuple[str, ...]
    comment: str = ""
    line: int = 0  # line number in the Markdown file (1-based) where the command's logical line starts
    env: dict[str, str] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return program_kind(self.argv)


def program_kind(argv: tuple[str, ...] | list[str]) -> str:
    if not argv:
        return "other"
    program = argv[0].rsplit("/", 1)[-1]
    if program == "wanflow":
        return "wanflow"
    if program == "wan-generate":
        return "wan.generate"
    runs_module = any(argv[i] == "-m" and argv[i + 1] == "wan.generate" for i in range(len(argv) - 1))
    if runs_module and (re.fullmatch(r"python(3(\.\d+)?)?", program) or program == "torchrun"):
        return "wan.generate"
    return "other"


def shell_blocks(text: str) -> list[tuple[int, str, list[str]]]:
    """(first line number, language, lines) of every fenced block whose language is a shell's."""
    blocks: list[tuple[int, str, list[str]]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        opened = _FENCE.match(lines[i])
        if not opened:
            i += 1
            continue
        fence, language = opened.group(2), opened.group(3).lower()
        body: list[str] = []
        start = i + 2
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        i += 1  # the closing fence
        if language in SHELL_LANGUAGES:
            blocks.append((start, language, body))
    return blocks


def _split_comment(line: str) -> tuple[str, str]:
    """(code, comment) of one logical line: the comment starts at an unquoted `#` that begins a word."""
    quote = None
    escaped = False
    for n, char in enumerate(line):
        if escaped:
            escaped = False
        elif char == "\\" and quote != "'":
            escaped = True
        elif quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (n == 0 or line[n - 1].isspace()):
            return line[:n].rstrip(), line[n + 1 :].strip()
    return line.rstrip(), ""


def _logical_lines(start: int, language: str, body: list[str]) -> list[tuple[int, str]]:
    """Backslash continuations joined; console prompts (`$ `) dropped and their output lines skipped."""
    out: list[tuple[int, str]] = []
    pending: list[str] = []
    first = 0
    for n, raw in enumerate(body):
        line = raw.rstrip()
        if not pending:
            if language == "console":
                if not line.lstrip().startswith("$ "):
                    continue  # the command's output, not a command
                line = line.lstrip()[2:]
            first = start + n
        if line.endswith("\\"):
            pending.append(line[:-1])
            continue
        pending.append(line)
        out.append((first, " ".join(part.strip() for part in pending)))
        pending = []
    if pending:
        out.append((first, " ".join(part.strip() for part in pending)))
    return out


def _expand(code: str, variables: dict[str, str]) -> str:
    """`$NAME` and `${NAME}` of the block's earlier assignments replaced by their values (unquoted, so the
    shell splits them into words as shlex will)."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return variables.get(name, match.group(0))

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)", value, code)


def _words(code: str) -> list[str]:
    lexer = shlex.shlex(code, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = ""
    return list(lexer)


def commands(text: str) -> list[Command]:
    """Every command of the shell blocks of `text`, in order (see the module's docstring)."""
    found: list[Command] = []
    for start, language, body in shell_blocks(text):
        variables: dict[str, str] = {}
        for line_no, logical in _logical_lines(start, language, body):
            code, comment = _split_comment(logical)
            if not code.strip():
                continue
            words = _words(_expand(code, variables))
            pieces: list[list[str]] = [[]]
            for word in words:
                if word in _OPERATORS:
                    pieces.append([])
                else:
                    pieces[-1].append(word)
            for piece in pieces:
                env: dict[str, str] = {}
                while piece and _ASSIGNMENT.match(piece[0]):
                    name, value = _ASSIGNMENT.match(piece[0]).groups()
                    env[name] = value
                    piece = piece[1:]
                if not piece:  # a bare assignment: a variable of this block
                    variables.update(env)
                    continue
                found.append(Command(" ".join(piece), tuple(piece), comment, line_no, env))
    return found
