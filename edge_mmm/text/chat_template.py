"""Render a model's Jinja chat template the way transformers' `apply_chat_template` does.

Same sandboxed environment (trim_blocks, lstrip_blocks, loopcontrols), the same `tojson` filter and
globals (`raise_exception`, `strftime_now`), and the tokenizer's special tokens as variables.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any, Dict, List, Mapping, Optional, Sequence

from edge_mmm.errors import InputError, ModelFileError

Message = Mapping[str, Any]


def _raise_exception(message):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers overrides jinja's tojson, which would HTML-escape
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_template(source: str):
    """Compile once per template text."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generation(jinja2.ext.Extension):
        # `{% generation %}` marks assistant spans for training masks; rendering keeps the body as-is
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ModelFileError(f"the model's chat template does not parse: {exc}") from exc


def text_messages(messages: Sequence[Message]) -> List[Dict[str, Any]]:
    """Chat messages for a text LM: each a dict with a `role` and a `content` that is a string, or a list of
    OpenAI-style text parts (`{"type": "text", "text": ...}`, joined); an image part, or any other content,
    is an InputError naming the message."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m:
            raise InputError(f"chat messages must be dicts with 'role' and 'content', got {m!r}")
        content = m.get("content")
        if isinstance(content, (list, tuple)):
            kinds = [p.get("type") if isinstance(p, Mapping) else type(p).__name__ for p in content]
            other = next((k for k in kinds if k != "text"), None)
            if other is not None:
                hint = "; images need a vision-language model (edge-mmm ask)" if other in ("image", "image_url") else ""
                raise InputError(f"messages[{i}] has a {other!r} content part; a text LM takes text parts{hint}")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise InputError(f"messages[{i}].content must be a string or a list of text parts, got "
                             f"{type(content).__name__}")
        out.append({**m, "content": content})
    return out


def render_chat(template: Optional[str], messages: Sequence[Message], add_generation_prompt: bool = True,
                special_tokens: Optional[Dict[str, str]] = None, tools: Optional[List[dict]] = None,
                **kwargs) -> str:
    """Messages -> prompt text; special tokens are passed as `bos_token`, `eos_token`, ..."""
    from jinja2.exceptions import TemplateError

    if not template:
        raise ModelFileError("the model has no chat template; pass a plain text prompt instead of messages")
    for m in messages:
        if not isinstance(m, Mapping) or "role" not in m:
            raise InputError(f"chat messages must be dicts with 'role' and 'content', got {m!r}")
    variables = {f"{k}_token": v for k, v in (special_tokens or {}).items()}
    variables.update(kwargs)
    try:
        return compile_template(template).render(messages=[dict(m) for m in messages], tools=tools,
                                                 documents=None, add_generation_prompt=add_generation_prompt,
                                                 **variables)
    except TemplateError as exc:
        raise InputError(f"chat template rejected the conversation: {exc}") from exc
