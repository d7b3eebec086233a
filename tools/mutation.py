"""Mutation testing of tokenopt/ops, tokenopt/plan.py and tokenopt/passes against the fast tests.

    python tools/mutation.py                      # every area: ops, plan, passes
    python tools/mutation.py ops plan             # some areas
    python tools/mutation.py --rerun              # re-check only the survivors of the last run
    python tools/mutation.py --report             # print the last results, run nothing
    python tools/mutation.py --baseline           # without tests/test_mutants_*.py (for comparison)

Each area runs ``mutmut run`` in its own copy of the repository (``--workdir``, default
``$TMPDIR/tokenopt-mutation/<area>``): mutmut rewrites sources under ``mutants/``, so mutated code
never appears in the working tree where other test runs import tokenopt. The areas, the files each
one mutates and the fast tests that exercise them are ``[tool.tokenopt.mutation.<area>]`` in
pyproject.toml; the options shared by every area are ``[tool.mutmut]``. Survivors judged
equivalent (they cannot change any result) are listed with the reason in
``tools/mutation-equivalent.txt``; the report counts them apart from the others.

With ``--rerun`` the copy is kept: sources and tests are synced into it (unchanged files keep their
results), and only mutants that survived, had no tests or timed out are run again, e.g. after new
tests were written. Not part of .ci/run: a full run takes about an hour on 2 cores.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EQUIVALENT = ROOT / "tools" / "mutation-equivalent.txt"
COPIED = ("tokenopt", "tests", "recipes", "pyproject.toml")
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped",
          36: "timeout", 24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout", 37: "type check",
          -11: "segfault", -9: "segfault", None: "not checked"}
RECHECK = {"survived", "no tests", "timeout", "not checked", "suspicious"}   # a crash (segfault) is a kill


def settings() -> tuple[dict, dict]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return data["tool"]["mutmut"], data["tool"]["tokenopt"]["mutation"]


def equivalent() -> dict[str, tuple[str, str, str]]:
    """mutant name -> (kind, why, changed line) from tools/mutation-equivalent.txt; kind is
    "equivalent" (no result can change) or "tool" (killed by a test that cannot run under mutmut).
    Each entry is ``NAME KIND: WHY`` followed by an indented ``+ LINE``, the line as the mutant
    changed it: mutmut renumbers a function's mutants when the function changes, so an entry
    counts only while the mutant of that name still makes that change."""
    out: dict[str, tuple[str, str, str]] = {}
    last = None
    if EQUIVALENT.exists():
        for line in EQUIVALENT.read_text().splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            if line[:1].isspace() and line.strip().startswith("+") and last:
                kind, why, _ = out[last]
                out[last] = (kind, why, line.strip()[1:].strip())
                continue
            name, _, rest = line.partition(" ")
            kind, _, why = rest.partition(":")
            out[name] = (kind.strip(), why.strip(), "")
            last = name
    return out


def sync(src: Path, dst: Path) -> None:
    """Copy the files mutmut needs, keeping modification times (mutmut reuses results of files
    whose copy is older than its mutants) and deleting files the tree no longer has."""
    for name in COPIED:
        s, d = src / name, dst / name
        if s.is_file():
            shutil.copy2(s, d)
            continue
        wanted = set()
        for path in s.rglob("*"):
            if "__pycache__" in path.parts or not path.is_file():
                continue
            rel = path.relative_to(s)
            wanted.add(rel)
            target = d / rel
            if not target.exists() or target.stat().st_mtime != path.stat().st_mtime \
                    or target.read_bytes() != path.read_bytes():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
        if d.exists():
            for path in list(d.rglob("*")):
                if path.is_file() and "__pycache__" not in path.parts and path.relative_to(d) not in wanted:
                    path.unlink()


def write_config(work: Path, base: dict, area: dict, baseline: bool = False) -> None:
    """The copy's pyproject: the tree's, with [tool.mutmut] narrowed to this area (``baseline``:
    without the tests written for mutants, tests/test_mutants_*.py)."""
    text = (ROOT / "pyproject.toml").read_text()
    text = re.sub(r"(?ms)^\[tool\.mutmut\].*?(?=^\[(?!tool\.mutmut\])|\Z)", "", text)
    text = re.sub(r"(?ms)^\[tool\.tokenopt\.mutation.*?(?=^\[(?!tool\.tokenopt\.mutation)|\Z)", "", text)
    tests, skip = [], False
    for t in area["tests"]:   # test files not written yet (or removed) are left out, with a note
        if baseline and t.startswith("tests/test_mutants_"):
            print(f"   (baseline: {t} left out)")
        elif not skip and not t.startswith("-") and not (work / t.split("::")[0]).exists():
            print(f"   (no {t.split('::')[0]}: left out of the selection)")
        else:
            tests.append(t)
        skip = t in ("--deselect", "-k", "-m")
    cfg = {**base, "only_mutate": area["mutate"], "pytest_add_cli_args_test_selection": tests}
    lines = ["", "[tool.mutmut]"] + [f"{k} = {json.dumps(v)}" for k, v in cfg.items()]
    (work / "pyproject.toml").write_text(text.rstrip() + "\n" + "\n".join(lines) + "\n")


def results(work: Path, area: dict) -> dict[str, str]:
    """mutant name -> status, for the files this area mutates."""
    import fnmatch
    out = {}
    for meta in sorted((work / "mutants").rglob("*.py.meta")):
        rel = str(meta.relative_to(work / "mutants"))[:-5]
        if not any(fnmatch.fnmatch(rel, p) for p in area["mutate"]):
            continue
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            # a test process killed by a signal (SIGSEGV, SIGABRT: the native step handed a bad
            # pointer or shape) noticed the mutant as surely as a failing assertion
            crashed = isinstance(code, int) and code < 0 and code not in (-24,)
            out[name] = STATUS.get(code, "segfault" if crashed else "suspicious")
    return out


def diff(work: Path, name: str) -> list[str]:
    """The changed lines of one mutant, from the spans mutmut writes next to each mutated file."""
    module, _, func = name.rpartition(".")
    path = work / "mutants" / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = work / "mutants" / module.replace(".", "/") / "__init__.py"
    spans = json.loads(Path(str(path) + ".spans").read_text())["spans"]
    orig = func.rsplit("__mutmut_", 1)[0] + "__mutmut_orig"
    src = path.read_text().splitlines()
    (a, b), (oa, ob) = spans[func], spans[orig]
    before = [ln.replace(orig, "f") for ln in src[oa - 1:ob]]
    after = [ln.replace(func, "f") for ln in src[a - 1:b]]
    return [ln.strip() for ln in difflib.unified_diff(before, after, lineterm="", n=0)
            if ln[:1] in "+-" and not ln.startswith(("---", "+++"))]


def report(area_name: str, work: Path, area: dict, equiv: dict[str, tuple[str, str, str]], show: bool) -> dict:
    res = results(work, area)
    counts = Counter(res.values())
    survivors = sorted(n for n, s in res.items() if s == "survived")

    def listed(n: str) -> str:
        """The entry's kind if it describes this mutant's change, else ""."""
        if n not in equiv:
            return ""
        kind, _, changed = equiv[n]
        plus = [d[1:].strip() for d in diff(work, n) if d.startswith("+")]
        return kind if changed and changed in plus else ""

    eq = [n for n in survivors if listed(n) == "equivalent"]
    tool = [n for n in survivors if listed(n) == "tool"]
    real = [n for n in survivors if not listed(n)]
    line = {"area": area_name, "generated": len(res), "killed": counts["killed"], "survived": len(survivors),
            "equivalent": len(eq), "untestable_under_mutmut": len(tool), "not_equivalent": len(real),
            "timeout": counts["timeout"], "no_tests": counts["no tests"], "segfault": counts["segfault"],
            "other": sum(v for k, v in counts.items()
                         if k not in ("killed", "survived", "timeout", "no tests", "segfault"))}
    print(f"{area_name:7s} generated {line['generated']:5d}  killed {line['killed']:5d}  "
          f"survived {line['survived']:4d} (equivalent {len(eq)}, killed outside mutmut {len(tool)}, "
          f"other {len(real)})  timeout {line['timeout']}  crashed {line['segfault']}  "
          f"no tests {line['no_tests']}  other {line['other']}")
    prefix = tuple("tokenopt." + p.split("*")[0].removesuffix(".py").rstrip("/").replace("/", ".")
                   for p in area["mutate"])
    stale = [n for n in equiv if n.startswith(prefix) and (n not in res or res[n] != "survived" or not listed(n))]
    if stale:
        print(f"  stale entries in {EQUIVALENT.name} (gone, killed, or now another change): {', '.join(stale)}")
    if show:
        for n in real + [n for n, s in res.items() if s in RECHECK - {"survived"}]:
            print(f"  {res[n]:9s} {n}")
            for d in diff(work, n):
                print(f"      {d[:200]}")
    return line


def main() -> int:
    base, areas = settings()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("areas", nargs="*", metavar="AREA", help=f"areas to run (default: all of {', '.join(areas)})")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "tokenopt-mutation")
    ap.add_argument("--jobs", type=int, default=2, help="mutants tested in parallel")
    ap.add_argument("--rerun", action="store_true", help="keep the copy; re-check only survivors")
    ap.add_argument("--report", action="store_true", help="print the last results only")
    ap.add_argument("--baseline", action="store_true",
                    help="leave out tests/test_mutants_*.py: what the rest of the suite kills on its own")
    ap.add_argument("--quiet", action="store_true", help="do not list the non-equivalent survivors")
    ap.add_argument("--json", type=Path, help="also write the per-area numbers here")
    args = ap.parse_args()
    chosen = args.areas or list(areas)
    unknown = [a for a in chosen if a not in areas]
    if unknown:
        ap.error(f"unknown area {unknown[0]!r}; the areas are {', '.join(areas)}")
    equiv = equivalent()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("MUTANT_UNDER_TEST", None)
    lines = []
    for name in chosen:
        area, work = areas[name], args.workdir / name
        if not args.report:
            start = time.time()
            todo: list[str] = []
            if args.rerun and (work / "mutants").exists():
                todo = sorted(n for n, s in results(work, area).items() if s in RECHECK)
                print(f"== {name}: re-checking {len(todo)} mutants", flush=True)
            else:
                shutil.rmtree(work, ignore_errors=True)
                work.mkdir(parents=True)
                print(f"== {name}: fresh copy in {work}", flush=True)
            sync(ROOT, work)
            write_config(work, base, area, args.baseline)
            if args.rerun and not todo and (work / "mutants").exists():
                print("   nothing to re-check")
            else:
                cmd = ["mutmut", "run", "--max-children", str(args.jobs), *todo]
                with open(work / "mutmut-run.log", "a") as log:
                    done = subprocess.run(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
                if done.returncode != 0:
                    print(f"   mutmut failed ({done.returncode}); see {work / 'mutmut-run.log'}")
                    return done.returncode
            print(f"   {time.time() - start:.0f} s", flush=True)
        lines.append(report(name, work, area, equiv, show=not args.quiet))
    if args.json:
        args.json.write_text(json.dumps(lines, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
