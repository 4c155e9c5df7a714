"""MkDocs hooks: the API reference must be complete, and math becomes MathML.

* ``on_config``: every name in ``bayesopt_jax.__all__`` must appear in
  ``docs/api.md`` as a ``::: bayesopt_jax.NAME`` block; a missing one fails
  the build.
* ``on_page_content``: formulas marked by ``pymdownx.arithmatex`` (generic
  mode) and the ``.. math::`` blocks / ``:math:`` roles of docstrings are
  converted to MathML at build time with ``latex2mathml``, so the pages
  render math without any script or network request; ``:func:`` references
  of docstrings become links within the API page.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

from latex2mathml.converter import convert
from mkdocs.exceptions import PluginError

_API = re.compile(r"^:::\s+bayesopt_jax\.(\w+)\s*$", re.M)


def on_config(config, **kwargs):
    import bayesopt_jax

    api = (Path(config["docs_dir"]) / "api.md").read_text(encoding="utf-8")
    documented = set(_API.findall(api))
    missing = sorted(set(bayesopt_jax.__all__) - documented)
    unknown = sorted(documented - set(bayesopt_jax.__all__))
    if missing or unknown:
        raise PluginError(f"docs/api.md is out of date: missing {missing}, not public {unknown}")
    return config


def _mathml(tex: str, display: bool) -> str:
    tex = html.unescape(tex).strip()
    # latex2mathml does not know these alignment environments' ampersands
    # outside of an environment; strip the alignment markers.
    tex = tex.replace("&=", "=").replace("&", " ").replace(r"\\", r"\quad ")
    return convert(tex, display="block" if display else "inline")


_BLOCK = re.compile(r'<div class="arithmatex">\s*\\\[(.*?)\\\]\s*</div>', re.S)
_INLINE = re.compile(r'<span class="arithmatex">\s*\\\((.*?)\\\)\s*</span>', re.S)
# docstrings: ".. math::" followed by an indented block, rendered by
# mkdocstrings as a paragraph, and the :math:`...` role.
_RST_BLOCK = re.compile(r"<p>\.\. math::\s*(.*?)</p>", re.S)
_RST_ROLE = re.compile(r":math:<code>(.*?)</code>", re.S)
# :func:`~bayesopt_jax.name` and friends: a link when the name is public.
_RST_REF = re.compile(r":(?:func|class|meth|attr):<code>~?([\w.]+)</code>")


def _reference(match: re.Match) -> str:
    import bayesopt_jax

    name = match.group(1).rsplit(".", 1)[-1]
    if name in bayesopt_jax.__all__:
        return f'<a href="#bayesopt_jax.{name}"><code>{name}</code></a>'
    return f"<code>{name}</code>"


def on_page_content(content, **kwargs):
    content = _BLOCK.sub(lambda m: _mathml(m.group(1), True), content)
    content = _INLINE.sub(lambda m: _mathml(m.group(1), False), content)
    content = _RST_BLOCK.sub(lambda m: _mathml(m.group(1), True), content)
    content = _RST_ROLE.sub(lambda m: _mathml(m.group(1), False), content)
    content = _RST_REF.sub(_reference, content)
    return content
