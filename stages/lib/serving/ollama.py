"""Ollama Modelfile text and the chat-template formats it can express.

Pure: strings in, strings out. Ollama templates use Go's text/template; `render_go_template`
renders the small subset emitted here so a test can check, without Ollama, that the Modelfile
turns a conversation into exactly the text `tokenizer.apply_chat_template` produces.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


class TemplateError(ValueError):
    """A chat template or Go template this module cannot handle."""


@dataclass(frozen=True)
class TemplateKind:
    name: str
    template: str          # Go text/template over .Messages (Ollama puts SYSTEM first as a system message)
    stops: tuple[str, ...]  # strings that end a turn; Ollama stops generating at any of them


# Ollama prepends the Modelfile SYSTEM as a system message, so both templates walk .Messages
# and always end with the assistant header (= add_generation_prompt=True).
CHATML = TemplateKind(
    name="chatml",
    template=(
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n"
        "{{ .Content }}<|im_end|>\n"
        "{{ end }}<|im_start|>assistant\n"
    ),
    stops=("<|im_start|>", "<|im_end|>"),
)

LLAMA3 = TemplateKind(
    name="llama3",
    template=(
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
        "{{ .Content }}<|eot_id|>\n"
        # the line break above is for readability only; `{{-` removes it again
        "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    stops=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
)

# Phi-3 Instruct: <|role|> headers (system, user, assistant), <|end|> closing every turn.
PHI3 = TemplateKind(
    name="phi3",
    template=(
        "{{- range .Messages }}<|{{ .Role }}|>\n"
        "{{ .Content }}<|end|>\n"
        "{{ end }}<|assistant|>\n"
    ),
    stops=("<|end|>", "<|user|>", "<|endoftext|>"),
)

TEMPLATE_KINDS = (CHATML, LLAMA3, PHI3)


def plain_kind(eos_token: str) -> TemplateKind:
    """model.prompt_format: plain as a Go template (stages/lib/model/chat.py render_prompt_text): the system line,
    `### Question:` / `### Answer:` blocks, each earlier answer closed by the EOS text and a blank line."""
    if not eos_token:
        raise TemplateError("model.prompt_format: plain ends every answer with EOS; the tokenizer has none")
    return TemplateKind(
        name="plain",
        template=(
            '{{- range .Messages }}{{ if eq .Role "system" }}{{ if .Content }}{{ .Content }}\n{{ end }}{{ end }}'
            '{{ if eq .Role "user" }}### Question:\n{{ .Content }}\n\n### Answer:\n{{ end }}'
            '{{ if eq .Role "assistant" }}{{ .Content }}' + eos_token + '\n\n{{ end }}{{ end }}'
        ),
        stops=(eos_token,),
    )

# A conversation that exercises every part of a template: system turn, a finished exchange, a new question.
PROBE_MESSAGES = (
    {"role": "system", "content": "System text."},
    {"role": "user", "content": "First question?"},
    {"role": "assistant", "content": "First answer."},
    {"role": "user", "content": "Second question?"},
)


@dataclass(frozen=True)
class DetectedTemplate:
    kind: TemplateKind
    bos_prefix: str  # text the HF template puts before the first turn that Ollama adds as a BOS token instead


def detect_template_kind(rendered_probe: str, bos_token: str | None) -> DetectedTemplate:
    """Which supported format an HF chat template is, from its rendering of PROBE_MESSAGES
    (with add_generation_prompt=True). Llama-3 templates start with the BOS text; Ollama's
    tokenizer adds BOS itself, so it is accepted as a prefix and kept out of the Go template."""
    for kind in TEMPLATE_KINDS:
        ours = render_go_template(kind.template, PROBE_MESSAGES)
        if rendered_probe == ours:
            return DetectedTemplate(kind, "")
        if bos_token and rendered_probe == bos_token + ours:
            return DetectedTemplate(kind, bos_token)
    supported = ", ".join(k.name for k in TEMPLATE_KINDS)
    raise TemplateError(
        f"the tokenizer's chat template is not one the Ollama export supports ({supported}: "
        "<|im_start|>role\\ncontent<|im_end|>\\n, <|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|> or "
        "<|role|>\\ncontent<|end|>\\n); it renders a probe conversation as "
        f"{rendered_probe[:300]!r}; export with --no-modelfile for the merged model without an Ollama Modelfile")


def _quote(text: str, what: str) -> str:
    # Modelfile values in triple quotes are taken verbatim; the only thing they cannot hold is the delimiter.
    if '"""' in text:
        raise TemplateError(f'{what} contains """, which a Modelfile cannot quote')
    return f'"""{text}"""'


def build_modelfile(system_prompt: str, kind: TemplateKind, *, max_new_tokens: int, do_sample: bool,
                    temperature: float, top_p: float, repetition_penalty: float) -> str:
    """Modelfile for a model folder beside it (FROM .), with the decoding of the evaluate stage."""
    lines = [
        "# Ollama Modelfile written by `python -m tools.export`; build with: ollama create <name> -f Modelfile",
        "FROM .",
        f"TEMPLATE {_quote(kind.template, 'the template')}",
        f"SYSTEM {_quote(system_prompt, 'the system prompt')}",
    ]
    lines += [f'PARAMETER stop "{stop}"' for stop in kind.stops]
    lines.append(f"PARAMETER num_predict {max_new_tokens}")
    if do_sample:
        # top_k 0 = no top-k cut, as the evaluate stage samples (nucleus and temperature only)
        lines += [f"PARAMETER temperature {temperature:g}", f"PARAMETER top_p {top_p:g}", "PARAMETER top_k 0"]
    else:
        lines.append("# do_sample is false in params.yaml eval: temperature 0 is Ollama's greedy decoding")
        lines.append("PARAMETER temperature 0")
    lines += [
        # transformers penalises every token already in the context; repeat_last_n -1 does the same in Ollama
        f"PARAMETER repeat_penalty {repetition_penalty:g}",
        "PARAMETER repeat_last_n -1",
    ]
    return "\n".join(lines) + "\n"


_MODELFILE_LINE = re.compile(r'^(?P<cmd>[A-Z]+)\s+(?:(?P<key>[a-z_]+)\s+)?(?P<value>"""(?s:.*?)"""|"[^"]*"|\S+)', re.M)


def parse_modelfile(text: str) -> dict:
    """The commands of a Modelfile this module wrote: {"FROM": str, "TEMPLATE": str, "SYSTEM": str,
    "PARAMETER": [(key, value), ...]} with quotes removed (enough for tests, not a full parser)."""
    out: dict = {"PARAMETER": []}
    # a line starting with # is a comment only outside a triple-quoted value (the plain template has "### Answer:")
    kept, quoted = [], False
    for line in text.splitlines():
        if quoted or not line.startswith("#"):
            kept.append(line)
        quoted ^= line.count('"""') % 2 == 1
    text = "\n".join(kept)
    for match in _MODELFILE_LINE.finditer(text):
        value = match["value"]
        value = value[3:-3] if value.startswith('"""') else value.strip('"')
        if match["cmd"] == "PARAMETER":
            out["PARAMETER"].append((match["key"], value))
        else:
            out[match["cmd"]] = value
    return out


# ---- a tiny Go text/template renderer: text, {{ .Field }}, {{ . }}, range/if/else/end, if eq .Field "literal",
# {{- -}} trimming ----

_ACTION = re.compile(r"\{\{(-\s)?\s*(.*?)\s*(\s-)?\}\}", re.S)
_FIELD = re.compile(r"^(\.|(\.[A-Za-z_]\w*)+)$")
_EQ = re.compile(r'^eq\s+(\.(?:[A-Za-z_]\w*)(?:\.[A-Za-z_]\w*)*)\s+"([^"]*)"$')  # eq .Role "user"


def _tokens(template: str) -> list[tuple[str, str]]:
    """[("text", s) | ("action", s)] with Go's whitespace trimming already applied."""
    out: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    for match in _ACTION.finditer(template):
        text = template[pos:match.start()]
        if trim_next:
            text = text.lstrip(" \t\r\n")
        if match[1]:
            text = text.rstrip(" \t\r\n")
        out.append(("text", text))
        out.append(("action", match[2]))
        pos, trim_next = match.end(), bool(match[3])
    tail = template[pos:]
    out.append(("text", tail.lstrip(" \t\r\n") if trim_next else tail))
    return out


def _parse(tokens: list[tuple[str, str]], i: int, closers: tuple[str, ...]) -> tuple[list, int, str | None]:
    """Nodes up to one of `closers` ("end"/"else"); returns (nodes, next index, closer found)."""
    nodes: list = []
    while i < len(tokens):
        kind, value = tokens[i]
        i += 1
        if kind == "text":
            nodes.append(("text", value))
            continue
        word, _, arg = value.partition(" ")
        if value in closers:
            return nodes, i, value
        if word in ("range", "if"):
            if not (_FIELD.match(arg.strip()) or (word == "if" and _EQ.match(arg.strip()))):
                raise TemplateError(f"unsupported Go template action {{{{{value}}}}}")
            body, i, closer = _parse(tokens, i, ("end", "else"))
            other: list = []
            if closer == "else":
                other, i, closer = _parse(tokens, i, ("end",))
            if closer != "end":
                raise TemplateError(f"{{{{{value}}}}} has no matching {{{{end}}}}")
            nodes.append((word, arg.strip(), body, other))
        elif _FIELD.match(value):
            nodes.append(("field", value))
        else:
            raise TemplateError(f"unsupported Go template action {{{{{value}}}}}")
    if closers:
        raise TemplateError(f"template ends before {{{{{closers[0]}}}}}")
    return nodes, i, None


def _lookup(dot, path: str):
    if path == ".":
        return dot
    for name in path.strip(".").split("."):
        if not isinstance(dot, dict) or name not in dot:
            raise TemplateError(f"no field {name!r} in {type(dot).__name__} (path {path})")
        dot = dot[name]
    return dot


def _execute(nodes: list, dot, out: list[str]) -> None:
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "field":
            out.append(str(_lookup(dot, node[1])))
        elif node[0] == "range":
            items = _lookup(dot, node[1]) or []
            for item in items:
                _execute(node[2], item, out)
            if not items:
                _execute(node[3], dot, out)
        else:  # "if": Go's truth = non-empty / non-zero, or `eq .Field "literal"`
            eq = _EQ.match(node[1])
            truth = _lookup(dot, eq[1]) == eq[2] if eq else _lookup(dot, node[1])
            _execute(node[2] if truth else node[3], dot, out)


def render_go_template(template: str, messages, system: str = "") -> str:
    """Render `template` as Ollama would for a chat of `messages` ({"role", "content"} dicts)."""
    nodes, _, _ = _parse(_tokens(template), 0, ())
    data = {
        "System": system,
        "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages],
    }
    out: list[str] = []
    _execute(nodes, data, out)
    return "".join(out)
