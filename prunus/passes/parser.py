"""Parser for the pipeline grammar of DESIGN.md:

    pipeline := pass ("," pass)*
    pass     := NAME [ "(" [ arg ("," arg)* ] ")" ]
    arg      := KEY "=" value
    value    := INT | FLOAT | "true" | "false" | IDENT | QUOTED_STRING | "[" [value ("," value)*] "]"

Every error is a `SpecError` carrying the 1-based column of the offending character.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from prunus.errors import SpecError

_TOKEN = re.compile(
    r"""(?P<ws>\s+)
      | (?P<float>[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)|[-+]?(?:\d+\.\d*|\.\d+))
      | (?P<int>[-+]?\d+)
      | (?P<ident>[A-Za-z_][A-Za-z0-9_.\-]*)
      | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
      | (?P<punct>[(),=\[\]])
    """,
    re.VERBOSE,
)


@dataclass(frozen=True)
class Token:
    kind: str  # int, float, ident, string, punct, end
    text: str
    column: int  # 1-based


@dataclass
class PassSpec:
    """One parsed pass: its name, raw argument values and where each came from in the text."""

    name: str
    args: dict = field(default_factory=dict)
    column: int = 1
    arg_columns: dict = field(default_factory=dict)


def tokenize(text: str) -> list[Token]:
    tokens, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            if text[pos] in "\"'":
                raise SpecError("unterminated string", text=text, column=pos + 1)
            raise SpecError(f"unexpected character {text[pos]!r}", text=text, column=pos + 1)
        kind = m.lastgroup
        if kind != "ws":
            tokens.append(Token(kind, m.group(), pos + 1))
        pos = m.end()
    tokens.append(Token("end", "", len(text) + 1))
    return tokens


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens = tokenize(text)
        self.i = 0

    @property
    def tok(self) -> Token:
        return self.tokens[self.i]

    def error(self, message: str, tok: Token | None = None, **kw) -> SpecError:
        tok = tok or self.tok
        return SpecError(message, text=self.text, column=tok.column, **kw)

    def expect(self, text: str, what: str, **kw) -> Token:
        tok = self.tok
        if tok.text != text or tok.kind != "punct":
            found = "end of text" if tok.kind == "end" else repr(tok.text)
            raise self.error(f"expected {what}, found {found}", **kw)
        self.i += 1
        return tok

    def pipeline(self) -> list[PassSpec]:
        if self.tok.kind == "end":
            raise self.error("empty pipeline: name at least one pass")
        specs = [self.pass_()]
        while self.tok.text == "," and self.tok.kind == "punct":
            self.i += 1
            if self.tok.kind == "end" or self.tok.text == ",":
                raise self.error("empty pipeline entry: a pass name must follow ','")
            specs.append(self.pass_())
        if self.tok.kind != "end":
            if self.tok.text == ")":
                raise self.error("unbalanced ')': no '(' is open")
            raise self.error(f"expected ',' between passes, found {self.tok.text!r}")
        return specs

    def pass_(self) -> PassSpec:
        tok = self.tok
        if tok.kind != "ident":
            raise self.error(f"expected a pass name, found {tok.text!r}")
        self.i += 1
        spec = PassSpec(tok.text, column=tok.column)
        if self.tok.text == "(" and self.tok.kind == "punct":
            open_tok = self.tok
            self.i += 1
            if self.tok.text == ")":
                self.i += 1
                return spec
            while True:
                if self.tok.kind == "end":
                    raise self.error("unbalanced '(': missing ')'", open_tok, pass_name=spec.name)
                if self.tok.text in (",", ")") and self.tok.kind == "punct":
                    raise self.error("empty argument", pass_name=spec.name)
                key_tok = self.tok
                if key_tok.kind != "ident":
                    raise self.error(f"expected a parameter name, found {key_tok.text!r}", pass_name=spec.name)
                self.i += 1
                self.expect("=", f"'=' after '{key_tok.text}'", pass_name=spec.name, key=key_tok.text)
                if key_tok.text in spec.args:
                    raise self.error("parameter given twice", key_tok, pass_name=spec.name, key=key_tok.text)
                spec.args[key_tok.text] = self.value(spec.name, key_tok.text)
                spec.arg_columns[key_tok.text] = key_tok.column
                if self.tok.text == "," and self.tok.kind == "punct":
                    self.i += 1
                    continue
                if self.tok.kind == "end":
                    raise self.error("unbalanced '(': missing ')'", open_tok, pass_name=spec.name)
                self.expect(")", "',' or ')'", pass_name=spec.name)
                break
        return spec

    def value(self, pass_name: str, key: str):
        tok = self.tok
        self.i += 1
        if tok.kind == "int":
            return int(tok.text)
        if tok.kind == "float":
            return float(tok.text)
        if tok.kind == "ident":
            return {"true": True, "false": False}.get(tok.text, tok.text)
        if tok.kind == "string":
            return bytes(tok.text[1:-1], "utf-8").decode("unicode_escape")
        if tok.text == "[":
            items = []
            if self.tok.text == "]":
                self.i += 1
                return items
            while True:
                if self.tok.kind == "end":
                    raise self.error("unbalanced '[': missing ']'", tok, pass_name=pass_name, key=key)
                items.append(self.value(pass_name, key))
                if self.tok.text == ",":
                    self.i += 1
                    continue
                self.expect("]", "',' or ']'", pass_name=pass_name, key=key)
                return items
        self.i -= 1
        found = "end of text" if tok.kind == "end" else repr(tok.text)
        raise self.error(f"expected a value, found {found}", pass_name=pass_name, key=key,
                         accepted="int, float, true, false, a name, a quoted string or a [list]")


def parse_pipeline(text: str) -> list[PassSpec]:
    """Parse pipeline text into `PassSpec`s (names and values are not checked against the registry here)."""
    if not isinstance(text, str):
        raise SpecError(f"pipeline text must be a string, got {type(text).__name__}")
    return _Parser(text).pipeline()
