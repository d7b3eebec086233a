"""The supported-models table: every model family tokenopt is meant to handle, as tokenopt sees it.

    python tools/supported_models.py                 # print the table (markdown)
    python tools/supported_models.py --write FILE    # also write it to FILE

Each family is a small random-init config built here (nothing is downloaded). For each one the
table says what tokenopt's own analysis found, never a hard-coded answer: the capture front end
(fx symbolic tracing, or torch.export when fx cannot trace the model), the blocks and how many
of them a pass may rewrite, the prefix tokens and where their count came from, the pooling, what
``tokenopt.optimize(model, tome r=2)`` does to the token counts, and, for refused blocks, why.

The diffusion denoisers (diffusers' UNet, DiT and PixArt, the ``diffusion`` extra) are saved with
``save_pretrained`` into a temporary folder and loaded as ``diffusers:DIR`` loads them. None of them
may lose a token (the output is an image), so their rows say what ``recipes/tomesd-50.yaml``
(op-level merging) does instead of stream-level ToMe, and list their token grids.
The docs build calls :func:`markdown`; :func:`rows` gives the same as plain dicts.
"""
from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tokenopt.record import record_of

ROOT = Path(__file__).resolve().parents[1]
TINY_HF = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
TIMM_SMALL = dict(img_size=32, patch_size=8, depth=2, num_classes=10)


def _timm(name: str, small: bool = True, **kw) -> Callable[[], nn.Module]:
    def build():
        import timm

        return timm.create_model(name, **({**TIMM_SMALL, **kw} if small else kw))
    return build


def _hf(config: str, model: str, **kw) -> Callable[[], nn.Module]:
    def build():
        import transformers

        return getattr(transformers, model)(getattr(transformers, config)(**{**TINY_HF, **kw}))
    return build


def _hf_plain(config: str, model: str, **kw) -> Callable[[], nn.Module]:
    """A Hugging Face model from its own config keys alone (Swin's differ from a ViT's)."""
    def build():
        import transformers

        return getattr(transformers, model)(getattr(transformers, config)(**kw))
    return build


def _open_clip() -> nn.Module:
    from tokenopt.sources import load_model

    return load_model("open_clip:ViT-B-32?image_size=32&patch_size=8&width=64&layers=2&head_width=32")[0]


def _diffusers(class_name: str, **config) -> Callable[[], nn.Module]:
    """A random-init diffusers denoiser, saved and loaded back through ``diffusers:DIR``."""
    def build():
        import tempfile

        from tokenopt.sources import load_model, require

        diffusers = require("diffusers", f"{class_name} (the diffusion extra)")
        with tempfile.TemporaryDirectory(prefix="tokenopt-supported-") as folder:
            getattr(diffusers, class_name)(**config).save_pretrained(folder)
            return load_model(f"diffusers:{folder}")[0]
    return build


def _torchvision() -> nn.Module:
    from torchvision.models import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64)


# (family, model as named in the table, builder, input side in pixels; None: a denoiser, whose config gives its inputs)
FAMILIES: list[tuple[str, str, Callable[[], nn.Module], int | None]] = [
    ("Hugging Face", "ViTForImageClassification", _hf("ViTConfig", "ViTForImageClassification",
                                                      intermediate_size=64, num_labels=10), 32),
    ("Hugging Face", "DeiTForImageClassificationWithTeacher",
     _hf("DeiTConfig", "DeiTForImageClassificationWithTeacher", intermediate_size=64, num_labels=10), 32),
    ("Hugging Face", "BeitForImageClassification", _hf("BeitConfig", "BeitForImageClassification",
                                                       intermediate_size=64, num_labels=10,
                                                       use_relative_position_bias=True), 32),
    ("Hugging Face", "CLIPVisionModelWithProjection", _hf("CLIPVisionConfig", "CLIPVisionModelWithProjection",
                                                          intermediate_size=64, projection_dim=16), 32),
    ("Hugging Face", "SiglipVisionModel", _hf("SiglipVisionConfig", "SiglipVisionModel", intermediate_size=64), 32),
    ("Hugging Face", "Dinov2Model", _hf("Dinov2Config", "Dinov2Model", mlp_ratio=2), 32),
    ("Hugging Face", "Dinov2WithRegistersModel", _hf("Dinov2WithRegistersConfig", "Dinov2WithRegistersModel",
                                                     mlp_ratio=2, num_register_tokens=4), 32),
    ("open_clip", "ViT-B-32 (visual tower)", _open_clip, 32),
    ("torchvision", "VisionTransformer (the class of vit_b_16)", _torchvision, 32),
    ("timm", "vit_small_patch16_224 (cls token)", _timm("vit_small_patch16_224"), 32),
    ("timm", "vit_medium_patch16_gap_256 (average pooling)", _timm("vit_medium_patch16_gap_256"), 32),
    ("timm", "vit_medium_patch16_reg4_gap_256 (registers)", _timm("vit_medium_patch16_reg4_gap_256"), 32),
    ("timm", "deit_small_distilled_patch16_224", _timm("deit_small_distilled_patch16_224"), 32),
    ("timm", "deit3_small_patch16_224 (LayerScale)", _timm("deit3_small_patch16_224"), 32),
    ("timm", "flexivit_small", _timm("flexivit_small"), 32),
    ("timm", "eva02_tiny_patch14_224 (RoPE)", _timm("eva02_tiny_patch14_224", img_size=28, patch_size=14), 28),
    ("timm", "beit_base_patch16_224 (relative position)", _timm("beit_base_patch16_224", embed_dim=64,
                                                                 num_heads=2), 32),
    ("timm", "cait_xxs24_224 (class attention)", _timm("cait_xxs24_224", depth=2, embed_dim=48, num_heads=2), 32),
    ("timm", "xcit_nano_12_p16_224 (cross-covariance)", _timm("xcit_nano_12_p16_224", patch_size=16), 32),
    ("timm", "swin_tiny_patch4_window7_224 (windows)", _timm("swin_tiny_patch4_window7_224", small=False, img_size=56,
                                                             patch_size=4, depths=(1, 1, 1, 1), embed_dim=32,
                                                             num_heads=(1, 2, 4, 8), window_size=7), 56),
    ("Hugging Face", "SwinForImageClassification (windows)", _hf_plain(
        "SwinConfig", "SwinForImageClassification", image_size=64, patch_size=4, embed_dim=16, depths=[1, 1],
        num_heads=[1, 2], window_size=4, num_labels=10), 64),
    # denoisers: their inputs come from the config (diffusers:DIR's example call), so no input side
    ("diffusers", "UNet2DConditionModel (SD-shaped)", _diffusers(
        "UNet2DConditionModel", sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
        norm_num_groups=8), None),
    ("diffusers", "DiTTransformer2DModel", _diffusers(
        "DiTTransformer2DModel", num_attention_heads=2, attention_head_dim=16, in_channels=4, num_layers=2,
        sample_size=16, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=8), None),
    ("diffusers", "PixArtTransformer2DModel", _diffusers(
        "PixArtTransformer2DModel", num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
        num_layers=2, sample_size=16, patch_size=2, cross_attention_dim=32, caption_channels=24,
        norm_num_groups=8), None),
]
TOME = {"version": 1, "rules": [{"pass": "tome", "r": 2}]}
OP_LEVEL = ROOT / "recipes" / "tomesd-50.yaml"      # what a denoiser's row applies (op-level merging)


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return (s.splitlines()[0] if s else type(e).__name__)[:300]


def describe(family: str, name: str, build: Callable[[], nn.Module], side: int | None) -> dict:
    """One row: what tokenopt's analysis and a ToMe r=2 rewrite make of the model (a denoiser: what
    ``recipes/tomesd-50.yaml`` makes of it, :func:`describe_denoiser`)."""
    import tokenopt
    from tokenopt.analysis import analyse
    from tokenopt.errors import TokenoptError

    row = {"family": family, "model": name, "capture": "", "blocks": "", "reducible": "", "prefix": "",
           "pooling": "", "tome_r2": "", "refused": ""}
    try:
        torch.manual_seed(0)
        model = build().eval()
    except Exception as e:   # a library too old or too new for this config: say so, do not hide the row
        row["refused"] = f"could not build it here: {type(e).__name__}: {_first_line(e)}"
        return row
    if getattr(model, "tokenopt_example", None) is not None:     # a denoiser (diffusers:DIR attached its call)
        return describe_denoiser(row, model)
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            a = analyse(model, x)
        except TokenoptError as e:
            row["refused"] = _first_line(e)
            if "torch.fx" in row["refused"]:   # auto capture reports fx's error; say why export failed too
                try:
                    analyse(model, x, capture="export")
                except TokenoptError as e2:
                    row["refused"] += f"; with torch.export: {_first_line(e2)}"
                except TypeError:   # a tokenopt without the export front end
                    pass
            return row
        row["capture"] = getattr(a, "capture", "fx")
        row["blocks"] = len(a.blocks)
        # a windowed block (Swin) is reduced inside its windows by the passes that know windows (ToMe, ToFu, SPA)
        inside_windows = [b.window is not None and b.refused_by == "windowed" and b.window.tiles for b in a.blocks]
        row["reducible"] = sum(b.refusal is None or w for b, w in zip(a.blocks, inside_windows))
        row["prefix"] = f"{a.prefix_tokens} ({a.prefix_source})" if a.prefix_source else str(a.prefix_tokens)
        row["pooling"] = ", ".join(p.kind for p in a.pooling) or "-"
        row["refused"] = _reasons([b.refusal for b, w in zip(a.blocks, inside_windows) if b.refusal and not w])
        try:
            fast = tokenopt.optimize(model, TOME, x, report=False)
            counts = [a.blocks[0].tokens] + [lp.tokens_out.max for lp in record_of(fast).plan.layers]
            with torch.no_grad():
                fast(x)
            row["tome_r2"] = " → ".join(map(str, counts))
        except TokenoptError as e:
            row["tome_r2"] = "refused"
            row["refused"] = row["refused"] or _first_line(e)
        except Exception as e:
            row["tome_r2"] = f"failed: {type(e).__name__}: {_first_line(e)}"
    return row


def describe_denoiser(row: dict, model: nn.Module) -> dict:
    """A denoiser's row: the analysis (capture, blocks, token grids) and what ``recipes/tomesd-50.yaml``
    does: every token stays in the stream (the output has the original's shape) and the ops it
    merges around (``op_level``, ``merged_ops``), the blocks it leaves alone (``left_alone``), or why
    it refuses. ``pooling`` is "per-patch output" when the analysis finds every token consumed."""
    import tokenopt
    from tokenopt.analysis import analyse
    from tokenopt.errors import TokenoptError
    from tokenopt.ops import grid_merge
    from tokenopt.sources.generator_models import predicted_noise

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            a = analyse(model)
        except TokenoptError as e:
            row["refused"] = _first_line(e)
            return row
        row["capture"] = a.capture
        row["blocks"] = len(a.blocks)
        row["reducible"] = sum(b.refusal is None for b in a.blocks)
        row["prefix"] = f"{a.prefix_tokens} ({a.prefix_source})" if a.prefix_source else str(a.prefix_tokens)
        kinds = list(dict.fromkeys(p.kind for p in a.pooling))
        row["pooling"] = "per-patch output" if kinds == ["tokens"] else ", ".join(kinds) or "-"
        row["grid"] = ", ".join(dict.fromkeys(f"{g[0]}x{g[1]}" if g else "none" for g in (s.grid for s in a.streams)))
        row["refused"] = _reasons([b.refusal for b in a.blocks if b.refusal])
        try:
            fast = tokenopt.optimize(model, OP_LEVEL, report=False, analysis=a)
            with torch.no_grad():
                before, after = (predicted_noise(a.example.call(m)) for m in (model, fast))
        except TokenoptError as e:
            row["op_level"] = "refused"
            row["refused"] = row["refused"] or _first_line(e)
            return row
        except Exception as e:
            row["op_level"] = f"failed: {type(e).__name__}: {_first_line(e)}"
            return row
    plan = record_of(fast).plan
    merged = sum(n.op == "call_function" and n.target is grid_merge.merge_tokens for n in fast.graph.nodes)
    kept = all(lp.tokens_out.max == lp.tokens_in.max for lp in plan.layers) and after.shape == before.shape
    tokens = ", ".join(dict.fromkeys(str(b.tokens) for b in a.blocks))
    row["op_level"] = f"{tokens} kept; {merged} ops merged" if kept else \
        " → ".join(map(str, [a.blocks[0].tokens] + [lp.tokens_out.max for lp in plan.layers]))
    row["merged_ops"] = merged
    row["left_alone"] = _reasons([why for _, why in plan.skipped])
    return row


def _reasons(refusals: list[str]) -> str:
    """Each distinct reason once (reasons that differ only in their numbers, e.g. one shape per Swin
    stage, count as one), with how many blocks gave it."""
    import re

    seen: dict[str, list] = {}
    for why in refusals:
        seen.setdefault(re.sub(r"\d+", "#", why), [why, 0])[1] += 1
    return "; ".join(f"{why} ({n} blocks)" if n > 1 else why for why, n in seen.values())


def rows() -> list[dict]:
    """One dict per family (see :func:`describe`), in the order of :data:`FAMILIES`."""
    return [describe(*f) for f in FAMILIES]


COLUMNS = [("family", "family"), ("model", "model"), ("capture", "capture"), ("blocks", "blocks (reducible)"),
           ("prefix", "prefix tokens"), ("pooling", "pooling"), ("tome_r2", "tokens with ToMe"),
           ("refused", "refused, and why")]


def markdown(table: list[dict] | None = None) -> str:
    """The table as a markdown page section (computed now unless ``table`` is given). The long
    texts (where a prefix count came from, why blocks are refused) go in lists under the table,
    so its columns fit the page at 800 px."""
    table = rows() if table is None else table

    def cell(r, key):
        if key == "blocks":
            return f"{r['blocks']} ({r['reducible']})" if r["blocks"] != "" else "-"
        if key == "prefix":
            return str(r["prefix"]).split(" (", 1)[0] or "-"
        if key == "refused":
            return f"[yes](#refused-{_slug(r['model'])})" if r["refused"] else "-"
        if key == "tome_r2" and r.get("op_level"):      # a denoiser: recipes/tomesd-50.yaml, op-level
            return f"[{r['op_level']}](#denoisers)"
        return str(r[key]).replace("|", "\\|") or "-"

    # smaller type, so the columns fit at 800 px (docs/stylesheets/extra.css: .compact)
    columns = COLUMNS[:-1] + [("refused", "refused")]
    lines = ['<div class="compact" markdown="1">', "",
             "| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r, k) for k, _ in columns) + " |" for r in table]
    lines += ["", "</div>"]
    sources: dict[str, list[str]] = {}
    for r in table:
        count, _, source = str(r["prefix"]).partition(" (")
        if source:
            sources.setdefault(source.removesuffix(")"), []).append(r["model"])
    lines += ["", "Where the prefix-token count came from:", ""]
    lines += [f"- {src}: {', '.join(models)}" for src, models in sources.items()]
    denoisers = [r for r in table if r.get("grid") or r.get("op_level")]
    if denoisers:
        lines += ["", "## Diffusion denoisers { #denoisers }", "",
                  "A denoiser's output is an image, so no token may be lost: its row says what "
                  "`recipes/tomesd-50.yaml` (op-level merging: merge the tokens an op reads, run it, copy its output "
                  "back to every position) does instead of `tome r=2`: the token counts the stream keeps, the ops merged around, and the blocks "
                  "the recipe leaves alone. The token grids are the analysis' (read from the feature maps the tokens "
                  "come from and go back to).", ""]
        for r in denoisers:
            alone = f"; left alone: {r['left_alone']}" if r.get("left_alone") else ""
            lines.append(f"- {r['model']}: token grids {r.get('grid') or '-'}; with `recipes/tomesd-50.yaml`: "
                         f"{r.get('op_level') or '-'}{alone}")
    lines += ["", "## Refused blocks, and why", ""]
    for r in table:
        if r["refused"]:
            lines += [f'### {r["model"]} {{ #refused-{_slug(r["model"])} }}', "", r["refused"], ""]
    import tokenopt

    versions = _versions()
    head = ("# Supported models\n\n"
            "Generated by `python tools/supported_models.py` from tokenopt's own analysis of a small "
            "random-init model of each family (nothing hard-coded): the capture front end (`fx` symbolic "
            "tracing, or `export` = torch.export when fx cannot trace the model), the transformer blocks found "
            "and how many a pass may rewrite, the prefix tokens (cls, distillation, registers), the pooling, "
            "the tokens per block after `tokenopt.optimize(model, tome r=2)` (a diffusion denoiser, which may "
            "lose no token: what `recipes/tomesd-50.yaml` does, [below](#denoisers)), and whether blocks are "
            "refused (the reasons are listed under the table).\n\n"
            f"tokenopt {tokenopt.__version__}; {versions}.\n\n")
    return head + "\n".join(lines) + "\n"


def _slug(name: str) -> str:
    import re

    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _versions() -> str:
    import importlib

    out = [f"torch {torch.__version__}"]
    for mod in ("timm", "transformers", "open_clip", "torchvision", "diffusers"):
        try:
            out.append(f"{mod} {importlib.import_module(mod).__version__}")
        except Exception:
            out.append(f"{mod} not installed")
    return ", ".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", metavar="FILE", type=Path,
                    help="also write the table to FILE (the docs build generates its own page)")
    args = ap.parse_args(argv)
    text = markdown()
    print(text)
    if args.write:
        args.write.write_text(text)
        print(f"wrote {args.write}")


if __name__ == "__main__":
    main()
