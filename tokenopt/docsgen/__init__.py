"""The documentation site's generated pages: what ``mkdocs build`` writes from the code itself.

``docs/hooks/generate.py`` (an mkdocs hook) calls :func:`tokenopt.docsgen.site.generate`; nothing
here is committed as output. One module per kind of page:

    examples      every shipped recipe applied to a small ViT: one block before/after (SVG through
                  Graphviz, Mermaid), the per-layer report, ``tokenopt inspect``; the pass pages;
                  the generation recipes on the demo generators' UNet and DiT: the generation page
    recipe_ref    the recipe reference from the pass Options schemas, errors from real validation
    cli_ref       the command-line reference from the Typer app
    results       the measured trade-offs (docs/results/tradeoffs.yaml) as tables, for several pages
    transcripts   getting started and troubleshooting: commands run in-process, real output
    site          assembles the pages and checks them (a missing graph or key fails the build)

This package sits at the top of the layers (beside the CLI): it runs the pipeline and the app.
"""
