"""Chat prompt rendering from the model's own template (GGUF `tokenizer.chat_template`)."""
from __future__ import annotations

from typing import Iterable, Mapping

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _check_messages(messages: Iterable[Mapping[str, str]]) -> list[dict]:
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be a mapping with 'role' and 'content'")
        if not isinstance(m["content"], str):
            raise TypeError(f"message {i}: content must be a str")
        out.append(dict(m))
    if not out:
        raise ValueError("messages is empty")
    return out


def render(template: str | None, messages, *, add_generation_prompt: bool = True,
           bos_token: str = "", eos_token: str = "") -> str:
    """Render messages with a Jinja chat template (Hugging Face semantics); ChatML when the model has none."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    msgs = _check_messages(messages)

    def raise_exception(msg):
        raise ValueError(f"chat template error: {msg}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    try:
        tmpl = env.from_string(template or CHATML)
        return tmpl.render(messages=msgs, add_generation_prompt=add_generation_prompt,
                           bos_token=bos_token, eos_token=eos_token)
    except jinja2.TemplateError as e:
        raise ValueError(f"cannot render the model's chat template: {e}") from e
