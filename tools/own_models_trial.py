"""Issue 23's trial, rerun: small random-init models, tried as a new user would, through the Python API
and the command line, in one markdown table.

    python tools/own_models_trial.py                 # print the table (about 2-3 minutes)
    python tools/own_models_trial.py --only dinov2   # the rows whose name contains a word

Per model (built here, nothing downloaded):

    inspect         ``tokenopt inspect MODEL``: the blocks found, or the refusal's first line
    apply --check   ``tokenopt apply tome-r2.yaml MODEL -o OUT --check``: what the check reports
    export          ``tokenopt export OUT -o OUT.pt2``
    r=0             the largest difference between ``tokenopt.optimize(model, tome r=0)`` and the model
    type            whether the optimized module returns the original's output type
    2nd size        where the original runs on an image one patch larger in each side: r=0 there
                    (difference to the original) and r=2 (runs, or the message); "-" where it does not
    keywords        return_dict=False, output_hidden_states=True, labels= (Hugging Face): "ok" when the
                    optimized module answers as the original does, "refused" when it says clearly why
                    not, else the raw error

CLI runs are in-process (typer's CliRunner), with the models saved to a temporary folder: a Hugging
Face folder (``hf:``), a ``timm:``/``torchvision:``/``open_clip:`` spec, or this file's factory.
"""
from __future__ import annotations

import argparse
import inspect
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

HF = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
RECIPE = "version: 1\nrules:\n  - pass: tome\n    r: 2\n"


class HandAttention(nn.Module):
    """Attention with separate q, k, v projections, written out."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = (p(x).view(b, n, self.heads, c // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = (q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(-1)
        return self.out((a @ v).transpose(1, 2).reshape(b, n, c))


class HandBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = HandAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class HandViT(nn.Module):
    """A user's own ViT: cls token, learned positions, separate q/k/v."""

    def __init__(self, img: int = 32, patch: int = 8, dim: int = 32, depth: int = 2, heads: int = 2,
                 classes: int = 10):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, (img // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(HandBlock(dim, heads) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])


def hand_written_vit(**kw) -> nn.Module:
    """The factory the CLI rows name (``own_models_trial:hand_written_vit``)."""
    torch.manual_seed(0)
    return HandViT(**kw)


def _hf(config: str, model: str, **kw) -> Callable[[], nn.Module]:
    def build():
        import transformers
        given = {k: v for k, v in {**HF, **kw}.items() if v is not None}    # None: the config's own default
        return getattr(transformers, model)(getattr(transformers, config)(**given))
    return build


def _spec(spec: str) -> Callable[[], nn.Module]:
    def build():
        from tokenopt.sources import load_model
        return load_model(spec)[0]
    build.spec = spec
    return build


# (family, model, builder, image side)
MODELS: list[tuple[str, str, Callable[[], nn.Module], int]] = [
    ("HF", "ViT", _hf("ViTConfig", "ViTForImageClassification", image_size=32, patch_size=8, num_labels=5), 32),
    ("HF", "DeiT (distilled)", _hf("DeiTConfig", "DeiTForImageClassificationWithTeacher", image_size=32, patch_size=8,
                                   num_labels=5), 32),
    ("HF", "DINOv2", _hf("Dinov2Config", "Dinov2Model", image_size=64, patch_size=8), 64),
    ("HF", "DINOv2 (registers)", _hf("Dinov2WithRegistersConfig", "Dinov2WithRegistersModel", image_size=64,
                                     patch_size=8, num_register_tokens=4), 64),
    ("HF", "DINOv2 (98 px, patch 14)", _hf("Dinov2Config", "Dinov2Model", image_size=98, patch_size=14), 98),
    ("HF", "CLIP vision", _hf("CLIPVisionConfig", "CLIPVisionModel", image_size=32, patch_size=8), 32),
    ("HF", "SigLIP vision", _hf("SiglipVisionConfig", "SiglipVisionModel", image_size=32, patch_size=8), 32),
    ("HF", "BEiT", _hf("BeitConfig", "BeitForImageClassification", image_size=64, patch_size=8, num_labels=5), 64),
    ("HF", "Swin", _hf("SwinConfig", "SwinForImageClassification", image_size=64, patch_size=4, embed_dim=16,
                       depths=[1, 1], num_heads=[1, 2], window_size=4, num_labels=5, num_hidden_layers=None,
                       hidden_size=None, num_attention_heads=None, intermediate_size=None), 64),
    ("HF", "ViTMAE", _hf("ViTMAEConfig", "ViTMAEModel", image_size=32, patch_size=8), 32),
    ("timm", "vit_small", _spec("timm:vit_small_patch16_224?img_size=64&depth=2&num_classes=5"), 64),
    ("timm", "vit_small (dynamic_img_size)",
     _spec("timm:vit_small_patch16_224?img_size=64&depth=2&num_classes=5&dynamic_img_size=true"), 64),
    ("timm", "deit3_small", _spec("timm:deit3_small_patch16_224?img_size=64&depth=2&num_classes=5"), 64),
    ("timm", "eva02_tiny (RoPE)", _spec("timm:eva02_tiny_patch14_224?img_size=56&depth=2&num_classes=5"), 56),
    ("timm", "swin_tiny", _spec("timm:swin_tiny_patch4_window7_224?img_size=56&depths=1,1&num_heads=1,2&embed_dim=16"
                                "&num_classes=5"), 56),
    ("timm", "convnext_atto", _spec("timm:convnext_atto?num_classes=5"), 64),
    ("timm", "vit reg4", _spec("timm:vit_medium_patch16_reg4_gap_256?img_size=64&depth=2&num_classes=5"), 64),
    ("torchvision", "vit_b_16 (32 px)", _spec("torchvision:vit_b_16?image_size=32&num_classes=5"), 32),
    ("open_clip", "ViT-B-32", _spec("open_clip:ViT-B-32?image_size=32&patch_size=8&width=64&layers=2&head_width=32"),
     32),
    ("own", "hand-written ViT (q/k/v)", _spec("own_models_trial:hand_written_vit"), 32),
]


def _line(e: BaseException | str, n: int = 90) -> str:
    s = (str(e).strip().splitlines() or [""])[0] if isinstance(e, BaseException) else e
    s = s.removeprefix("error: ")
    return (s[:n] + "…" if len(s) > n else s).replace("|", "/")


def _leaves(out) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _diff(a, b) -> float:
    la, lb = _leaves(a), _leaves(b)
    if len(la) != len(lb) or any(u.shape != v.shape for u, v in zip(la, lb)):
        return float("nan")
    return max(((u.double() - v.double()).abs().max().item() for u, v in zip(la, lb)), default=0.0)


def cli(*args) -> tuple[int, str]:
    from typer.testing import CliRunner

    from tokenopt.cli import app
    r = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    text = r.output + (getattr(r, "stderr", "") if r.stderr_bytes is not None else "")
    return r.exit_code, text


def _cli_rows(spec: str, work: Path, side: int) -> dict:
    row = {}
    size = ["--input-size", f"3,{side},{side}"] if not spec.startswith("hf:") else []
    code, out = cli("inspect", spec, *size)
    row["inspect"] = "ok" if code == 0 else f"exit {code}: {_line(_first_error(out))}"
    recipe = work / "tome-r2.yaml"
    recipe.write_text(RECIPE)
    art = work / "fast.tokenopt.pt"
    code, out = cli("apply", recipe, spec, "-o", art, "--check", *size)
    if code == 0:
        said = [s.strip() for s in out.splitlines() if s.startswith("check ")]
        said = [s.split(": ", 1)[-1].replace("max |original - optimized| =", "max diff") for s in said]
        row["apply --check"] = _line(said[0] if said else "ok (no check line)", 80)
    else:
        row["apply --check"] = f"exit {code}: {_line(_first_error(out))}"
    if code == 0:
        code, out = cli("export", art, "-o", work / "fast.pt2")
        row["export"] = "ok" if code == 0 else f"exit {code}: {_line(_first_error(out))}"
    else:
        row["export"] = "-"
    return row


def _first_error(out: str) -> str:
    lines = [s for s in out.splitlines() if s.strip()]
    return next((s for s in lines if s.startswith("error")), lines[-1] if lines else "")


def _keywords(model, fast, x) -> str:
    """return_dict=False, output_hidden_states=True, labels=: what the optimized module does."""
    from tokenopt.calling import CallError
    if not type(model).__module__.startswith("transformers"):
        return "-"
    said = []
    labels = torch.zeros(len(x), dtype=torch.long)
    for kw in ({"return_dict": False}, {"output_hidden_states": True}, {"labels": labels}):
        name = next(iter(kw))
        try:
            with torch.no_grad():
                model(x, **kw)
        except TypeError:
            said.append(f"{name}: n/a")      # the original does not take it either
            continue
        try:
            with torch.no_grad():
                got = fast(x, **kw)
            if name == "return_dict":
                ok = isinstance(got, tuple)
            else:
                ok = True
            said.append(f"{name}: {'ok' if ok else 'wrong type'}")
        except CallError:
            said.append(f"{name}: refused")
        except Exception as e:
            said.append(f"{name}: raw {type(e).__name__}")
    return "; ".join(said)


def trial(family: str, name: str, build: Callable[[], nn.Module], side: int, work: Path) -> dict:
    import tokenopt
    from tokenopt.analysis.capture import spatial_axes
    from tokenopt.analysis.example import Example
    from tokenopt.calling import CallError

    row = {"family": family, "model": name}
    torch.manual_seed(0)
    try:
        model = build().eval()
    except Exception as e:
        row["inspect"] = f"cannot build: {_line(e)}"
        return row
    spec = getattr(build, "spec", None)
    if spec is None:
        folder = work / "hf"
        model.save_pretrained(folder)
        spec = f"hf:{folder}"
    row.update(_cli_rows(spec, work, side))
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))
    # a Hugging Face model that takes other sizes when asked to interpolate its position embeddings
    # is optimized from an example that asks
    flags = {"interpolate_pos_encoding": True} if "interpolate_pos_encoding" in \
        inspect.signature(model.forward).parameters else {}
    example = Example((x,), flags)
    try:
        same = tokenopt.optimize(model, {"version": 1, "rules": [{"pass": "tome", "r": 0}]}, example, report=False)
        fast = tokenopt.optimize(model, {"version": 1, "rules": [{"pass": "tome", "r": 2}]}, example, report=False)
    except Exception as e:
        row["r=0"] = f"refused: {_line(e, 60)}"
        return row
    with torch.no_grad():
        want, got, merged = model(x), same(x), fast(x)
    row["r=0"] = f"{_diff(want, got):.1e}".replace("0.0e+00", "0 (exact)")
    row["type"] = "kept" if type(got) is type(want) and type(merged) is type(want) else \
        f"{type(want).__name__} -> {type(merged).__name__}"
    spatial = spatial_axes(model, example)
    if spatial is None:
        row["2nd size"] = "- (the original takes one size)"
    else:
        patch = spatial[0]
        big = torch.randn(2, 3, side + patch, side + patch, generator=torch.Generator().manual_seed(1))
        how = " (interpolate_pos_encoding)" if flags else ""
        try:
            with torch.no_grad():
                d = _diff(model(big, **flags), same(big))
                fast(big)
            row["2nd size"] = f"{side + patch} px{how}: r=0 {d:.1e}, r=2 runs".replace("0.0e+00", "exact")
        except CallError as e:
            row["2nd size"] = f"{side + patch} px refused: {_line(e, 60)}"
        except Exception as e:
            row["2nd size"] = f"{side + patch} px: raw {type(e).__name__}: {_line(e, 50)}"
    row["keywords"] = _keywords(model, fast, x)
    return row


COLUMNS = ("family", "model", "inspect", "apply --check", "export", "r=0", "type", "2nd size", "keywords")


def markdown(rows: list[dict]) -> str:
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    out += ["| " + " | ".join(str(r.get(c, "")) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="only the rows whose model name contains this (case-insensitive)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows, start = [], time.time()
    with warnings.catch_warnings(), tempfile.TemporaryDirectory() as tmp:
        warnings.simplefilter("ignore")
        for i, (family, name, build, side) in enumerate(MODELS):
            if args.only and args.only.lower() not in name.lower():
                continue
            work = Path(tmp) / str(i)
            work.mkdir()
            t = time.time()
            rows.append(trial(family, name, build, side, work))
            print(f"{name}: {time.time() - t:.1f}s", file=sys.stderr)
    print(markdown(rows))
    print(f"\n({time.time() - start:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
