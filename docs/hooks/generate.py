"""mkdocs hook: the generated pages (tokenopt.docsgen) join the site while it builds; none is committed.

mkdocs.yml names this file under ``hooks:``. The tokenopt imported is the one in this repository
(its root goes first on sys.path), so the pages describe the code being built.
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mkdocs.exceptions import PluginError  # noqa: E402
from mkdocs.structure.files import File  # noqa: E402

log = logging.getLogger("mkdocs.hooks.tokenopt")
_generated = None


def _generate():
    global _generated
    if _generated is None:
        from tokenopt.docsgen import site
        from tokenopt.errors import TokenoptError
        start = time.perf_counter()
        try:
            _generated = site.generate(ROOT)
        except (site.DocsBuildError, TokenoptError, AssertionError) as e:
            raise PluginError(f"tokenopt docs: {e}") from None
        times = ", ".join(f"{k} {v:.0f} s" for k, v in _generated.timings.items())
        log.info(f"tokenopt docs: generated {len(_generated.files)} files in {time.perf_counter() - start:.0f} s "
                 f"({times})")
    return _generated


def on_config(config):
    from tokenopt.docsgen import site
    config.nav = site.nav(config.nav, _generate())
    return config


def on_files(files, config):
    for path, content in _generate().files.items():
        if files.get_file_from_path(path) is not None:
            raise PluginError(f"tokenopt docs: {path} is generated; remove the committed copy from docs/")
        files.append(File.generated(config, path, content=content))
    return files


def on_page_markdown(markdown, page, config, files):
    from tokenopt.docsgen import site
    gen = _generate()
    for name, section in gen.pass_sections.items():
        if page.file.src_uri == f"passes/{name}.md":
            return site.extend_pass_page(markdown, section)
    return markdown
