"""The Ollama `Modelfile` written beside an exported GGUF file (`ollama create NAME -f Modelfile`).

Ollama renders a chat with a Go text/template of its own, not the Jinja chat template in the
file, so the Modelfile carries the template in Ollama's syntax for the built-in families whose
rendering has been checked against posttrain's Jinja templates: ChatML and Gemma. Each renders
exactly what the Jinja template renders for a user turn, a system + user turn and a multi-turn
conversation (checked with Go's text/template feeding `.Messages` and `.System` as Ollama does;
the beginning-of-sequence token is the runner's, from the file's add_bos_token). A default
system prompt the Jinja template inserts (SmolLM2's) becomes the `SYSTEM` line. For any other
template no TEMPLATE is written: Ollama then picks one by the chat template stored in the file,
and the Modelfile says so. The stop parameters are the end-of-turn and end-of-sequence tokens
and the token that opens a turn, so a runtime that ignores the file's end-of-generation flags
still stops.
"""

from __future__ import annotations

FILE = "Modelfile"

TEMPLATES = {
    "chatml": (
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n"
        "{{ .Content }}<|im_end|>\n"
        "{{ end }}<|im_start|>assistant\n"
    ),
    "gemma": (  # Ollama's gemma3 template: a system message goes in front of the first user turn
        "{{- range $i, $_ := .Messages }}\n"
        "{{- $last := eq (len (slice $.Messages $i)) 1 }}\n"
        "{{- if eq .Role \"user\" }}<start_of_turn>user\n"
        "{{- if and (eq $i 1) $.System }}\n"
        "{{ $.System }}\n"
        "{{ end }}\n"
        "{{ .Content }}<end_of_turn>\n"
        "{{ else if eq .Role \"assistant\" }}<start_of_turn>model\n"
        "{{ .Content }}<end_of_turn>\n"
        "{{ end }}\n"
        "{{- if $last }}<start_of_turn>model\n"
        "{{ end }}\n"
        "{{- end }}"
    ),
}
OPENS_TURN = {"chatml": "<|im_start|>", "gemma": "<start_of_turn>"}


def family(builtin: str | None) -> str | None:
    """The Ollama template for a built-in as `templates.builtin_equivalent` names it ("chatml",
    "chatml with its default system prompt", ...), or None."""
    name = (builtin or "").split(" ")[0]
    return name if name in TEMPLATES else None


def stops(builtin: str | None, eot: str | None, eos: str | None) -> list[str]:
    """The stop strings: end-of-turn, the token that opens a turn, end-of-sequence (no repeats)."""
    found = [eot, OPENS_TURN.get(family(builtin) or ""), eos]
    return list(dict.fromkeys(s for s in found if s))


def modelfile(gguf_name: str, builtin: str | None, *, system: str | None, stop: list[str]) -> str:
    """The Modelfile's text, with `FROM ./<gguf_name>` (a path beside the Modelfile)."""
    if '"""' in (system or ""):
        raise ValueError("a system prompt holding \"\"\" cannot be written as a Modelfile string")
    name = family(builtin)
    lines = ["# Ollama: ollama create <name> -f Modelfile   (written by posttrain export)", f"FROM ./{gguf_name}", ""]
    if name:
        lines += [f'TEMPLATE """{TEMPLATES[name]}"""', ""]
        if system:
            lines += [f'SYSTEM """{system}"""', ""]
    else:
        lines += ["# No TEMPLATE: the chat template is not ChatML or Gemma; Ollama picks its template from the",
                  "# chat template stored in the GGUF file (tokenizer.chat_template). Check `ollama show --template`.",
                  ""]
    lines += [f'PARAMETER stop "{s}"' for s in stop]
    return "\n".join(lines) + "\n"
