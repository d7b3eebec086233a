"""What ``tokenopt tune`` writes: the recipe with its measured figures in comments, every judged schedule as a
Pareto CSV, and a PNG of quality against speedup with the shipped recipes and constant-r schedules on it."""
from __future__ import annotations

from pathlib import Path

import yaml

from tokenopt.tuning.methods import describe


def recipe_text(result, command: str = "") -> str:
    """The recipe YAML, headed by what was measured: speedup (and the prediction), GFLOPs, quality."""
    c, o = result.chosen, result.original
    q = c.judged.detail
    extra = ", ".join(f"{k} {100 * v:.1f}%" if k != "kl" and k != "distance" else f"{k} {v:.4f}"
                      for k, v in q.items())
    head = [
        f"tuned by `{command or 'tokenopt tune'}`",
        f"budget {result.budget}: measured {c.speedup:.2f}x over the original (cost model: {c.predicted:.2f}x), "
        f"{result.mode} batch {result.table.batch} on {result.device}",
        f"{c.gflops:.4f} GFLOPs per image (original {o.gflops:.4f})",
        f"{result.score_name} {100 * c.judged.score:.1f}% (original {100 * o.judged.score:.1f}%) on "
        f"{result.calibration_images} calibration images; {extra}",
        f"per layer: {describe(result.schedule)}",
        f"{len(result.points)} schedules judged in {result.seconds:.0f} s",
    ]
    head += result.notes
    body = yaml.safe_dump(result.recipe, sort_keys=False, default_flow_style=None)
    return "".join(f"# {line}\n" for line in head) + body


def write_recipe(result, path, command: str = "") -> None:
    from tokenopt.files import atomic_write

    with atomic_write(path, "w") as f:
        f.write(recipe_text(result, command))


def pareto_rows(result) -> list[dict]:
    """Every judged schedule (predicted speedup) and every timed model (measured speedup)."""
    rows = []
    timed = {m.name: m for m in result.measured}
    for p in sorted(result.points, key=lambda p: p.cost.speedup):
        name = describe(p.schedule)
        m = timed.get(name)
        if p.schedule == result.schedule:
            m = result.chosen
        rows.append({"kind": "tuned" if p.schedule == result.schedule else f"search:{p.stage}", "name": name,
                     "predicted_speedup": round(p.cost.speedup, 4),
                     "measured_speedup": round(m.speedup, 4) if m else "",
                     "gflops": round(p.cost.gflops, 6), "quality": round(p.judged.score, 4),
                     "loss": round(p.judged.loss, 5), "pareto": ""})
    for m in result.measured:
        if m.kind in ("shipped", "constant"):
            rows.append({"kind": m.kind, "name": m.name, "predicted_speedup": "", "measured_speedup": round(m.speedup, 4),
                         "gflops": round(m.gflops, 6), "quality": round(m.judged.score, 4),
                         "loss": round(m.judged.loss, 5), "pareto": ""})
    # on the front: no other judged schedule is both faster (as predicted) and of lower loss
    search = [r for r in rows if r["predicted_speedup"] != ""]
    for r in search:
        r["pareto"] = int(not any(o["predicted_speedup"] > r["predicted_speedup"] and o["loss"] < r["loss"]
                                  for o in search))
    return rows


def write_csv(result, path) -> None:
    from tokenopt.files import write_csv_rows
    write_csv_rows(pareto_rows(result), path)


def plot(result, path, title: str = "") -> None:
    """Quality against speedup: the search (predicted), the timed models (measured), the budget line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tokenopt.files import atomic_write

    rows = pareto_rows(result)
    fig, ax = plt.subplots(figsize=(6.8, 4.6), dpi=120)
    search = [r for r in rows if r["kind"].startswith("search")]
    ax.scatter([r["predicted_speedup"] for r in search], [100 * r["quality"] for r in search], s=10, color="0.7",
               label="schedules judged (predicted speedup)")
    front = sorted((r for r in search if r["pareto"]), key=lambda r: r["predicted_speedup"])
    ax.plot([r["predicted_speedup"] for r in front], [100 * r["quality"] for r in front], color="0.5", lw=1)
    const = sorted((m for m in result.measured if m.kind == "constant"), key=lambda m: m.speedup)
    ax.plot([m.speedup for m in const], [100 * m.judged.score for m in const], marker="o", label="constant r (measured)")
    for m in const:
        ax.annotate(m.name.split("=")[-1], (m.speedup, 100 * m.judged.score), fontsize=6, xytext=(2, 2),
                    textcoords="offset points")
    shipped = [m for m in result.measured if m.kind == "shipped"]
    ax.scatter([m.speedup for m in shipped], [100 * m.judged.score for m in shipped], marker="s", label="shipped recipes")
    for m in shipped:
        ax.annotate(m.name, (m.speedup, 100 * m.judged.score), fontsize=6, xytext=(2, -6), textcoords="offset points")
    c = result.chosen
    ax.plot([c.speedup], [100 * c.judged.score], marker="*", markersize=14, color="red", linestyle="",
            label=f"tuned ({c.speedup:.2f}x measured)")
    ax.plot([1.0], [100 * result.original.judged.score], marker="*", markersize=10, color="black", linestyle="",
            label="original")
    if result.budget.kind == "speed":
        ax.axvline(result.budget.value, color="red", lw=0.8, ls="--")
    ax.set_xlabel(f"speedup over the original ({result.mode}, batch {result.table.batch})")
    ax.set_ylabel(f"{result.score_name} on calibration images (%)")
    ax.set_title(title or f"tokenopt tune, budget {result.budget}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)
