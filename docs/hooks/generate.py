"""mkdocs hook: the generated pages (tokenopt.docsgen) join the site while it builds; none is committed.

mkdocs.yml names this file under ``hooks:``. The tokenopt imported is the one in this repository,
not an installed copy: MkDocs puts the hook's folder on sys.path only while it loads this file and
then restores sys.path, so an insert made at load time is undone before any page is generated.
:func:`checkout_tokenopt` makes the repository's root first on sys.path when the build starts
(``on_config``), drops a tokenopt imported from elsewhere, and refuses to go on when the import
still resolves outside the checkout.

The hook also copies Mermaid's script from an installed package into the site (``extra_javascript``
in mkdocs.yml): the diagrams draw with no network, and no CDN is named anywhere.
"""
from __future__ import annotations

import importlib.util
import logging
import sys
import time
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]
MERMAID_PACKAGE = "mermaidx"                 # PyPI; bundles Mermaid 11 as one browser script
MERMAID_FILE = "assets/mermaid.js"           # inside that package
MERMAID_SITE_PATH = "javascripts/mermaid.min.js"   # what mkdocs.yml's extra_javascript names

log = logging.getLogger("mkdocs.hooks.tokenopt")
_generated = None


def _inside(path: str | None, folder: Path) -> bool:
    return path is not None and Path(path).resolve().is_relative_to(folder)


def checkout_tokenopt():
    """The tokenopt package of this checkout, imported (``ROOT`` first on sys.path; a tokenopt
    imported from another place is forgotten first)."""
    root = str(ROOT)
    sys.path[:] = [root] + [p for p in sys.path if p != root]
    loaded = sys.modules.get("tokenopt")
    if loaded is not None and not _inside(getattr(loaded, "__file__", None), ROOT):
        for name in [n for n in sys.modules if n == "tokenopt" or n.startswith("tokenopt.")]:
            del sys.modules[name]
    import tokenopt
    if not _inside(tokenopt.__file__, ROOT):
        raise PluginError(f"tokenopt docs: the build would document {tokenopt.__file__}, not the checkout "
                          f"at {ROOT}; run mkdocs from the checkout")
    return tokenopt


def mermaid_script() -> bytes:
    """Mermaid's browser script, from the installed ``mermaidx`` package (the docs extra)."""
    spec = importlib.util.find_spec(MERMAID_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PluginError(f"tokenopt docs: the diagrams need Mermaid's script from the {MERMAID_PACKAGE} "
                          "package, which is not installed: pip install -e '.[docs]'")
    path = Path(next(iter(spec.submodule_search_locations))) / MERMAID_FILE
    if not path.is_file():
        raise PluginError(f"tokenopt docs: {path} is missing; reinstall {MERMAID_PACKAGE} "
                          "(pip install -e '.[docs]')")
    return path.read_bytes()


def _generate():
    global _generated
    if _generated is None:
        checkout_tokenopt()
        from tokenopt.docsgen import site
        from tokenopt.errors import TokenoptError
        start = time.perf_counter()
        try:
            _generated = site.generate(ROOT)
        except (site.DocsBuildError, site.results.ResultsError, TokenoptError, AssertionError) as e:
            raise PluginError(f"tokenopt docs: {e}") from None
        times = ", ".join(f"{k} {v:.0f} s" for k, v in _generated.timings.items())
        log.info(f"tokenopt docs: generated {len(_generated.files)} files in {time.perf_counter() - start:.0f} s "
                 f"({times})")
    return _generated


def on_config(config):
    checkout_tokenopt()
    from tokenopt.docsgen import site
    config.nav = site.nav(config.nav, _generate())
    return config


def on_files(files, config):
    for path, content in _generate().files.items():
        if files.get_file_from_path(path) is not None:
            raise PluginError(f"tokenopt docs: {path} is generated; remove the committed copy from docs/")
        files.append(File.generated(config, path, content=content))
    files.append(File.generated(config, MERMAID_SITE_PATH, content=mermaid_script()))
    return files


def on_page_markdown(markdown, page, config, files):
    from tokenopt.docsgen import site
    gen = _generate()
    for name, section in gen.pass_sections.items():
        if page.file.src_uri == f"passes/{name}.md":
            return site.extend_pass_page(markdown, section)
    return site.fill_placeholders(markdown, page.file.src_uri, gen)
