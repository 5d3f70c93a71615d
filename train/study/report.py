"""``python -m train.report ROOT [ROOT ...]``: a sweep's report, plots and verdicts on the paper's claims.

Reads only the files the runs wrote (``cell.json`` and the probe files it names: evaluation, other-genre
text, passkey, recall and budget; ``config.json``, ``data_budget.json``, ``eval.json``, ``latency*.json``,
``sweep_cost.jsonl``) and writes ``ROOT/report.md`` and ``ROOT/plots/*.png``; no number is typed in
except the paper's own (the lengths are the runs' ``final_eval_multiples``). The claims are judged on
held-out loss, or on recall error where the runs trained on a synthetic task alone; the sections
beyond the claims (recall by distance, other-genre text, controls, validity checks, statistical
power) come from ``train.study.findings``. With several roots, ``--summary FILE`` also writes one
table of every claim's verdict at every scale, with each root's validity checks and what no paper
measured, to a new file or (``--force``) over a summary it wrote before, which its first line marks;
it replaces no other file. The report is rebuilt from the files each time (it holds nothing else).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
from typing import TYPE_CHECKING, Any

from fibjax.cli import ArgumentParser
from train.cli import check_writable, exit_with, run_command, write_whole
from train.run import rundir
from train.study import findings, stats, sweeproot
from train.study.findings import (INERT_MAX, LEVEL_MAX, LOSS, RATIO, RECALL, Metric, fmt_pct, interval, mean_std,
                                  paired, ppl, save, table)
from train.study.sweep import read_sweep_file

if TYPE_CHECKING:  # matplotlib is imported only when plotting
  from matplotlib.axes import Axes

CLAIM_LENGTHS = (1, 4)  # the multiples of T the paper's claims compare: T and 4T
PAPER = {  # the paper's numbers (arXiv 2606.28560, abstract), compared against ours
    "dense_rise_4x": 2.01, "sparse_gap_1x": 0.26, "learned_latency": 5.0,
}
HOLD_MAX = 0.10  # a sparse variant "holds" at 4T when its rise's 95% upper bound is below +10%
COLLAPSE_MIN = 0.50  # dense "collapses" at 4T when its rise's 95% lower bound is above +50%
LATENCY_MIN = 2.5  # "~5x latency" agrees when the measured ratio is at least half of 5x
CONTROL_NAMES = ", ".join(f"`{v}`" for v in findings.CONTROLS)
SUMMARY_MARK = "<!-- written by python -m train.report --summary: it replaces this file only with --force -->"
RULE = ("Each comparison pairs runs of the same seed (same initial data order): per seed, the difference of "
        "held-out loss (log perplexity, nats) on identical target tokens; a 95% Student-t interval over seeds. "
        "Direction claims: **agree** when the interval excludes 0 on the paper's side, **disagree** when it "
        "excludes 0 on the other side, **inconclusive** when it contains 0. "
        f"\"Level\": agree when the interval lies within +-{LEVEL_MAX} nats, disagree when it excludes 0. "
        f"\"Inert\" learned alpha: agree when the interval's lower bound is above -{INERT_MAX} nats, disagree when "
        f"its upper bound is below 0. \"Holds at 4T\": the rise's upper bound below +{100 * HOLD_MAX:.0f}%; "
        f"\"collapses\": its lower bound above +{100 * COLLAPSE_MIN:.0f}%. Latency (one measurement per variant): "
        f"agree when learned/static is at least {LATENCY_MIN}x. The controls ({CONTROL_NAMES}) take no part in "
        "claims 4 and 5. A claim with several parts agrees when every part agrees and disagrees when any part "
        "disagrees.")
TASK_RULE = (  # RULE for runs trained on a synthetic task alone, judged on recall error (findings.RECALL)
    "These runs trained on a synthetic task alone, so every claim is judged on recall error (1 - recall accuracy, "
    "the fraction of answers whose every token is the greedy prediction) on the same evaluation sequences (one "
    "stream per seed, the same for every variant): per seed, the difference of recall error at length T (0.01 is one "
    "percentage point of accuracy); a 95% Student-t interval over seeds. Direction claims: **agree** when the "
    "interval excludes 0 on the paper's side, **disagree** when it excludes 0 on the other side, **inconclusive** "
    f"when it contains 0. \"Level\": agree when the interval lies within +-{RECALL.level} ({100 * RECALL.level:.0f} "
    "points), disagree when it excludes 0. \"Inert\" learned alpha: agree when the interval's lower bound is above "
    f"-{RECALL.inert}, disagree when its upper bound is below 0. Claim 4: per seed, the drop of recall accuracy from "
    f"T to 4T; a sparse variant \"holds\" when the drop's upper bound is below {HOLD_MAX} ({100 * HOLD_MAX:.0f} "
    f"points), dense \"collapses\" when its drop's lower bound is above {COLLAPSE_MIN}. Claim 5: the best sparse "
    "variant (lowest mean recall error at T) minus dense: agree when the interval's lower bound is above "
    f"+{RECALL.level} (dense recalls better by more than {100 * RECALL.level:.0f} points), disagree when its upper "
    f"bound is below +{RECALL.level}. Claim 6: per seed, the stagger gain (fib-linear minus fib-fixed accuracy) in "
    "each key-to-query distance bucket at T, then its mean over the far half of the buckets minus its mean over the "
    "near half (buckets in order of distance, the middle one of an odd count with the far half): spread evenly "
    "(agree) when that interval contains 0, concentrated (disagree) when it excludes 0, given an overall gain whose "
    "interval lies above 0 (inconclusive without one). Latency (one measurement per variant): agree when "
    f"learned/static is at least {LATENCY_MIN}x. The controls ({CONTROL_NAMES}) take no part in claims 4 and 5. A "
    "claim with several parts agrees when every part agrees and disagrees when any part disagrees.")


# ----------------------------------------------------------------------------- reading the runs


def read_json(path: pathlib.Path, fix: str = "run the sweep again to rewrite it") -> Any:
  """``path``'s JSON; raises ``ValueError`` naming the file (missing, unreadable or not JSON) and ``fix``."""
  try:
    return json.loads(path.read_text())
  except FileNotFoundError as e:
    raise ValueError(f"{path} is missing: {fix}") from e
  except (OSError, ValueError) as e:
    raise ValueError(f"{path} cannot be read as JSON ({type(e).__name__}: {e}): {fix}") from e


def load_cell(cell_path: pathlib.Path) -> dict:
  """One finished cell (``ROOT/<cell>/cell.json``) with the files it names read; raises
  ``ValueError`` naming the cell and the file when one is missing or not what ``train.study.experiment``
  writes. Removing ``cell.json`` and running the sweep again rewrites it, each missing stage run again."""
  from train.study.sweep import read_run_config  # noqa: PLC0415  (imports jax)

  d = cell_path.parent
  fix = f"remove {cell_path} and run the sweep again (it reruns the cell's missing stages and rewrites cell.json)"
  cell = read_json(cell_path, fix)
  try:
    files = {k: read_json(d / v, f"{cell_path} names it; {fix}") for k, v in cell["files"].items()}
    record = {"name": d.name, "variant": cell["variant"], "seed": cell["seed"], "train_s": cell["train_s"]}
  except (KeyError, TypeError, AttributeError) as e:
    raise ValueError(f"{cell_path} is not a cell record of train.study.experiment (no {e} in it): {fix}") from e
  return {**record, "config": read_run_config(d / rundir.CONFIG, d.parent),
          "budget_data": read_json(d / rundir.DATA_BUDGET, fix), "params": read_json(d / rundir.EVAL, fix)["params"],
          **files}


def load_cells(root: pathlib.Path) -> list[dict]:
  """Every finished cell of ``root`` (a folder holding ``cell.json``), with its files read; raises
  ``ValueError`` when they are not of one recipe (``train.study.sweep.check_one_recipe``)."""
  from train.study.sweep import check_one_recipe  # noqa: PLC0415

  cells = [load_cell(p) for p in sorted(root.glob(f"*/{rundir.CELL}"))]
  check_one_recipe(root, {c["name"]: c["config"] for c in cells})
  return cells


def check_root(root: pathlib.Path) -> None:
  if not root.is_dir():
    raise ValueError(f"{root} is not a folder: give a sweep root (python -m train.sweep --root ...)")


def finished_cells(root: pathlib.Path) -> tuple[list[dict], list[dict]]:
  """``(cells, everything)``: ``root``'s finished cells but same-seed reruns, and every finished
  cell; raises ``ValueError`` when ``root`` is not a folder or holds no finished cell."""
  check_root(root)
  everything = load_cells(root)
  cells = [c for c in everything if not sweeproot.rerun_index(c["name"])]
  if not cells:
    run = sweeproot.not_a_root(root)
    if run:
      raise ValueError(run)
    roots = sorted(c.name for c in root.iterdir() if rundir.is_sweep_root(c))
    if roots:
      raise ValueError(f"{root} holds sweep roots ({', '.join(roots)}), not cells: give one of them, e.g. "
                       f"{root / roots[0]}")
    raise ValueError(f"{root} holds no finished cell (ROOT/<variant>-s<seed>/cell.json): run python -m train.sweep")
  return cells, everything


def eval_multiples(root: pathlib.Path, cells: list[dict]) -> tuple[int, ...]:
  """The lengths (multiples of T) the cells were evaluated at, ascending: their configs'
  ``final_eval_multiples`` (the same in every cell of one recipe). Raises ``ValueError`` when they
  lack a length the paper's claims compare (``CLAIM_LENGTHS``)."""
  multiples = tuple(sorted(set(cells[0]["config"]["final_eval_multiples"])))
  if not set(CLAIM_LENGTHS) <= set(multiples):
    raise ValueError(f"{root}: the runs were evaluated at {', '.join(f'{m}x' for m in multiples)} T "
                     f"(final_eval_multiples), but the paper's claims compare "
                     f"{' and '.join(f'{m}x' for m in CLAIM_LENGTHS)} T: sweep again into a new --root with "
                     f"final_eval_multiples including {','.join(map(str, CLAIM_LENGTHS))}")
  return multiples


def by_variant(cells: list[dict]) -> dict[str, dict[int, dict]]:
  out: dict[str, dict[int, dict]] = {}
  for c in cells:
    out.setdefault(c["variant"], {})[c["seed"]] = c
  return out


def latest_latency(root: pathlib.Path) -> dict | None:
  """The last latency file ``train.latency`` wrote under ``root`` (its name under ``"file"``), or None."""
  files = sweeproot.latency_files(root)
  return {**read_json(files[-1]), "file": files[-1].name} if files else None


# ----------------------------------------------------------------------------- comparisons and verdicts


def lower_is(d: dict | None) -> str:
  """Verdict for "a has lower loss than b" from ``paired(a, b)``."""
  if d is None:
    return "inconclusive"
  return "agree" if d["hi"] < 0 else "disagree" if d["lo"] > 0 else "inconclusive"


def level(d: dict | None, bound: float = LEVEL_MAX) -> str:
  """Verdict for "a is level with b" from ``paired(a, b)``: its interval within +-``bound``."""
  if d is None:
    return "inconclusive"
  if -bound <= d["lo"] and d["hi"] <= bound:
    return "agree"
  return "disagree" if d["lo"] > 0 or d["hi"] < 0 else "inconclusive"


def combine(verdicts: list[str]) -> str:
  if "disagree" in verdicts:
    return "disagree"
  return "agree" if verdicts and all(v == "agree" for v in verdicts) else "inconclusive"


def rise_interval(runs: dict, variant: str, m: int = CLAIM_LENGTHS[-1], metric: Metric = LOSS) -> dict | None:
  """Per-seed change at ``m`` x T against 1x (``metric.change``: the perplexity rise on identical
  targets, or the drop of recall accuracy), with its interval."""
  if variant not in runs:
    return None
  return interval([metric.change(c, m) for c in runs[variant].values()], metric.change_unit,
                  f"{variant}: {m}x vs 1x T")


def claims(runs: dict, latency: dict | None, metric: Metric = LOSS) -> list[dict]:
  """The six claims of SPEC section 2, each with the paper's statement, ours, a verdict and the
  paired comparisons it rests on (``comparisons``), judged on ``metric`` (held-out loss, or recall
  error for runs trained on a task: ``findings.metric_of``)."""
  out = []
  fmt = metric.unit.describe

  def vs(a: str, b: str) -> dict | None:
    return paired(runs, a, b, metric.of, metric.unit)

  lin_fix, lin_learn = vs("fib-linear", "fib-fixed"), vs("fib-linear", "fib-learned")
  out.append({"claim": "1. static linear stagger beats fixed and learned alpha",
              "paper": "fib-linear lower perplexity than fib-fixed and fib-learned",
              "ours": f"linear - fixed {fmt(lin_fix)}; linear - learned {fmt(lin_learn)}",
              "verdict": combine([lower_is(lin_fix), lower_is(lin_learn)]), "comparisons": [lin_fix, lin_learn]})

  p_lin_fix, p_fib_fix = vs("pow2-linear", "pow2-fixed"), vs("pow2-linear", "fib-fixed")
  p_learn = vs("pow2-linear", "fib-learned")
  out.append({"claim": "2. the gain is base-agnostic",
              "paper": "pow2-linear beats pow2-fixed, lands above fib-fixed, level with fib-learned",
              "ours": (f"pow2-linear - pow2-fixed {fmt(p_lin_fix)}; - fib-fixed {fmt(p_fib_fix)}; "
                       f"- fib-learned {fmt(p_learn)}"),
              "verdict": combine([lower_is(p_lin_fix), lower_is(p_fib_fix), level(p_learn, metric.level)]),
              "comparisons": [p_lin_fix, p_fib_fix, p_learn]})

  learn_fix = vs("fib-learned", "fib-fixed")
  quality = "inconclusive"
  if learn_fix is not None:
    quality = "agree" if learn_fix["lo"] > -metric.inert else "disagree" if learn_fix["hi"] < 0 else "inconclusive"
  lat_text, lat_verdict = "latency not measured", "inconclusive"
  if latency and {"fib-learned", "fib-fixed"} <= set(latency["variants"]):
    lv, fv = latency["variants"]["fib-learned"], latency["variants"]["fib-fixed"]
    ratios = {k: lv[k] / fv[k] for k in ("forward_1x_ms", "forward_4x_ms", "decode_ms_per_token")}
    lat_text = ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()) + f" ({latency['device']})"
    lat_verdict = "agree" if max(ratios.values()) >= LATENCY_MIN else "disagree"
  out.append({"claim": "3. learned alpha is inert and costs ~5x inference latency",
              "paper": f"no better than static; ~{PAPER['learned_latency']:.0f}x latency",
              "ours": f"learned - fixed {fmt(learn_fix)}; learned/fixed latency: {lat_text}",
              "verdict": combine([quality, lat_verdict]), "comparisons": [learn_fix]})

  sparse = [v for v in runs if v != "dense" and v not in findings.CONTROLS]
  rises = {v: rise_interval(runs, v, metric=metric) for v in sorted(runs) if v not in findings.CONTROLS}
  holds = ["agree" if rises[v]["hi"] < HOLD_MAX else "disagree" if rises[v]["lo"] >= HOLD_MAX else "inconclusive"
           for v in sparse]
  dense = rises.get("dense")
  collapse = "inconclusive" if dense is None else ("agree" if dense["lo"] > COLLAPSE_MIN else
                                                   "disagree" if dense["hi"] <= COLLAPSE_MIN else "inconclusive")
  out.append({"claim": "4. sparse variants hold perplexity at 4T; dense collapses",
              "paper": f"little or no rise for sparse; dense +{100 * PAPER['dense_rise_4x']:.0f}%",
              "ours": f"{metric.change_name} at 4T: " + "; ".join(f"{v} {metric.change_unit.describe(d)}"
                                                                 for v, d in rises.items()),
              "verdict": combine(holds + [collapse]), "comparisons": list(rises.values())})
  out.append(gap_claim(runs, metric, sparse))
  out.append(position_claim(runs, metric))
  return out


def gap_claim(runs: dict, metric: Metric, sparse: list[str]) -> dict:
  """Claim 5: the best of the ``sparse`` variants against dense at T; on held-out text the per-seed
  perplexity ratio against the paper's band, on recall error the difference against ``metric.level``."""
  best = findings.best_sparse(runs, metric)
  verdict = "inconclusive"
  if metric.task:
    gap = best and paired(runs, best, "dense", metric.of, metric.unit)
    if gap is not None:
      verdict = "agree" if gap["lo"] > metric.level else "disagree" if gap["hi"] < metric.level else "inconclusive"
    ours = (f"best sparse ({best}) minus dense, {metric.name}: {metric.unit.describe(gap)}; agree when the lower "
            f"bound is above {metric.unit.num(metric.level)}, disagree when the upper bound is below it")
  else:
    gap = best and paired(runs, best, "dense", ppl, RATIO, relative=True)
    band = (PAPER["sparse_gap_1x"] / 2, PAPER["sparse_gap_1x"] * 1.5)
    if gap is not None:
      verdict = ("agree" if band[0] <= gap["mean"] <= band[1] else
                 "disagree" if gap["hi"] < band[0] or gap["lo"] > band[1] else "inconclusive")
    ours = (f"best sparse ({best}) vs dense: {fmt_pct(gap)}; agree when the mean lies in "
            f"[{100 * band[0]:.0f}%, {100 * band[1]:.0f}%]")
  missing = " and ".join(w for w, gone in (("a dense", "dense" not in runs), ("a sparse", not sparse)) if gone)
  return {"claim": "5. at T the best sparse model is ~26% worse than dense",
          "paper": f"+{100 * PAPER['sparse_gap_1x']:.0f}% perplexity",
          "ours": f"n/a: no finished run of {missing} variant to compare" if missing else ours,
          "verdict": verdict, "comparisons": [gap]}


def position_claim(runs: dict, metric: Metric = LOSS) -> dict:
  """Claim 6: the stagger gain (fib-fixed minus fib-linear ``metric``) at 1x T over its profile's
  buckets (``metric.profile``: context positions, or key-to-query distances), far half against near half."""
  base = {"claim": "6. the stagger gain is spread evenly across positions",
          "paper": "gain not concentrated at far positions", "comparisons": []}
  overall = paired(runs, "fib-fixed", "fib-linear", metric.of, metric.unit)
  if overall is None:
    return {**base, "ours": "n/a (runs missing)", "verdict": "inconclusive"}

  def half_gap(cell_fixed: dict, cell_linear: dict) -> float:
    g = [a - b for a, b in zip(metric.profile(cell_fixed), metric.profile(cell_linear))]
    h = len(g) // 2
    return stats.mean(g[h:]) - stats.mean(g[:h]) if h else math.nan

  seeds = sorted(set(runs["fib-fixed"]) & set(runs["fib-linear"]))
  gaps = [half_gap(runs["fib-fixed"][s], runs["fib-linear"][s]) for s in seeds]
  spread = None if any(map(math.isnan, gaps)) else interval(
      gaps, metric.unit, f"fib-fixed - fib-linear: far-half minus near-half gain by {metric.profile_name}")
  if overall["lo"] <= 0 or spread is None:
    verdict = "inconclusive"  # no significant gain to distribute, or a single bucket
  else:
    verdict = "agree" if spread["lo"] <= 0 <= spread["hi"] else "disagree"
  fmt = metric.unit.describe
  return {**base, "verdict": verdict, "comparisons": [overall, spread],
          "ours": (f"overall gain (fib-fixed - fib-linear {metric.name} at T) {fmt(overall)}; far-half minus "
                   f"near-half gain by {metric.profile_name} {fmt(spread)}; even when that interval contains 0 (given "
                   "a significant overall gain)")}


# ----------------------------------------------------------------------------- plots


def plot_all(runs: dict, latency: dict | None, out: pathlib.Path, multiples: tuple[int, ...], text: bool = True) -> None:
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  out.mkdir(exist_ok=True)
  variants = sorted(runs)

  text_plots = (out / "ppl_by_length.png", out / "loss_by_position.png")
  if not text:  # held-out text curves: runs that trained on text alone; an older build's are removed
    for path in text_plots:
      path.unlink(missing_ok=True)
  else:
    fig, ax = plt.subplots(figsize=(6, 4))
    for v in variants:
      ys = [[ppl(c, m) for c in runs[v].values()] for m in multiples]
      ax.errorbar(multiples, [stats.mean(y) for y in ys], yerr=[stats.std(y) for y in ys], marker="o", label=v,
                  capsize=3)
    ax.set(xlabel="evaluation length (x T)", ylabel="held-out perplexity", xticks=multiples,
           title="Perplexity against length (mean +- std over seeds)")
    perplexity_axis(ax)
    ax.legend(fontsize=7)
    save(fig, text_plots[0])

    fig, axes = plt.subplots(1, len(multiples), figsize=(4 * len(multiples), 3.5), sharey=True)
    for ax, m in zip(axes, multiples):
      for v in variants:
        cells = list(runs[v].values())
        edges = cells[0]["eval"][f"{m}x"]["bucket_edges"]
        mids = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
        ys = [stats.mean([c["eval"][f"{m}x"]["bucket_loss"][i] for c in cells]) for i in range(len(mids))]
        ax.plot(mids, ys, marker=".", label=v)
      ax.set(xlabel="context position", title=f"{m}x T", ylabel="loss (nats)" if m == multiples[0] else None)
    axes[0].legend(fontsize=6)
    save(fig, text_plots[1])

  pk = [v for v in variants if all("passkey" in c for c in runs[v].values())]
  if pk:
    fig, axes = plt.subplots(1, len(pk), figsize=(2.6 * len(pk), 3), squeeze=False)
    for ax, v in zip(axes[0], pk):
      grid, lengths, depths = passkey_grid(list(runs[v].values()))
      ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", origin="lower", aspect="auto")
      ax.set(xticks=range(len(depths)), xticklabels=[f"{d:g}" for d in depths], yticks=range(len(lengths)),
             yticklabels=lengths, xlabel="depth", title=v)
      for i in range(len(lengths)):
        for j in range(len(depths)):
          ax.text(j, i, f"{grid[i][j]:.2f}", ha="center", va="center", fontsize=6, color="w")
    axes[0][0].set_ylabel("context length")
    save(fig, out / "passkey.png")

  bud = [v for v in variants if text and v != "dense" and all("budget" in c for c in runs[v].values())]
  if bud:
    fig, axes = plt.subplots(1, len(bud), figsize=(3 * len(bud), 3), squeeze=False, sharey=True)
    for ax, v in zip(axes[0], bud):
      cells = list(runs[v].values())
      budgets = cells[0]["budget"]["budgets"]
      for m in multiples:
        pts = sorted((b["keys_per_query"], stats.mean([c["budget"]["budgets"][n][f"{m}x"]["ppl"] for c in cells]))
                     for n, b in budgets.items())
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{m}x T")
      ax.set(xlabel="keys per query", title=v)
    perplexity_axis(axes[0][0])  # the y axis all of them share
    axes[0][0].set_ylabel("perplexity")
    axes[0][0].legend(fontsize=7)
    save(fig, out / "budget.png")

  if latency:
    lv = latency["variants"]
    keys = ("forward_1x_ms", "forward_4x_ms", "decode_ms_per_token")
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for ax, k in zip(axes, keys):
      ax.bar(list(lv), [lv[v][k] for v in lv])
      ax.set(title=k, ylabel="ms")
      ax.tick_params(axis="x", rotation=60, labelsize=7)
    save(fig, out / "latency.png")


def perplexity_axis(ax: Axes) -> None:
  """Evenly spaced, alike tick labels on the y axis of plotted perplexities: a linear axis while
  they span less than a factor of 10 (a log axis would label its unevenly spaced minor ticks,
  3.7 3.8 3.9 4.0 ...), else a log axis labelled at each power of ten only, in plain numbers."""
  from matplotlib.ticker import LogLocator, MaxNLocator, NullFormatter, NullLocator, StrMethodFormatter  # noqa: PLC0415

  shared = ax.get_shared_y_axes().get_siblings(ax)  # the axes whose plotted values share this y axis
  lo, hi = min(a.dataLim.y0 for a in shared), max(a.dataLim.y1 for a in shared)
  if lo > 0 and hi / lo >= 10:
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10))
    ax.yaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_minor_formatter(NullFormatter())
  else:
    ax.yaxis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]))
    ax.ticklabel_format(axis="y", style="plain", useOffset=False)


def passkey_grid(cells: list[dict]) -> tuple[list[list[float]], list[int], list[float]]:
  """Accuracy ``[length][depth]`` averaged over the cells' seeds."""
  first = cells[0]["passkey"]["cells"]
  lengths = sorted({c["length"] for c in first})
  depths = sorted({c["depth"] for c in first})
  acc: dict[tuple[int, float], list[float]] = {}
  for cell in cells:
    for c in cell["passkey"]["cells"]:
      acc.setdefault((c["length"], c["depth"]), []).append(c["accuracy"])
  return [[stats.mean(acc[(n, d)]) for d in depths] for n in lengths], lengths, depths


# ----------------------------------------------------------------------------- the markdown


def kv_heads(model: dict) -> str:
  kv = model.get("num_kv_heads")
  return "" if kv in (None, model["num_heads"]) else f" ({kv} key/value heads)"


def build(root: pathlib.Path) -> tuple[str, list[dict], findings.Findings]:
  """``(markdown, claims, findings)`` for one sweep root; writes its plots under ``root/plots``."""
  cells, everything = finished_cells(root)
  reruns = [c for c in everything if sweeproot.rerun_index(c["name"])]
  multiples = eval_multiples(root, cells)
  runs = by_variant(cells)
  latency = latest_latency(root)
  sweep = read_sweep_file(root / sweeproot.SWEEP) if (root / sweeproot.SWEEP).exists() else {}
  c0 = cells[0]
  model = c0["config"]["model"]
  metric = findings.metric_of(cells)
  text = not metric.task  # the runs trained on text: held-out perplexity is theirs to report
  plot_all(runs, latency, root / sweeproot.PLOTS, multiples, text=text)
  found = findings.sections(runs, model, multiples, metric, root / sweeproot.PLOTS)
  recipe = (f"Recipe `{sweep.get('config')}` with overrides `{' '.join(sweep.get('overrides', [])) or 'none'}`"
            if sweep else f"No `{sweeproot.SWEEP}` in this root, so the recipe's name is unknown (the runs' configs "
            "are one recipe: checked)")
  lines = [f"# Sweep report: `{root.name}`", "",
           f"{recipe}; {len(cells)} finished runs ({len(runs)} variants). Built by `python -m train.report {root}` "
           "from the runs' files.", "", "## Scale", ""]
  budgets = {(c["budget_data"]["training_tokens"], c["budget_data"]["repeats"]) for c in cells}
  lines += table(["field", "value"], [
      ["model", f"d_model {model['d_model']}, {model['num_layers']} layers, {model['num_heads']} heads x "
                f"{model['head_dim']}{kv_heads(model)}, T = {model['seq_len']}, W = {model['window']}, {model['dtype']}"],
      ["parameters", ", ".join(sorted({f"{c['params']:,}" for c in cells}))],
      ["steps x batch", f"{c0['config']['steps']} x {c0['config']['batch_size']}"],
      ["training tokens per run", ", ".join(f"{t:,}" for t, _ in sorted(budgets))],
      ["passes over the training data", ", ".join(f"{r:.3g}" for _, r in sorted(budgets))],
      ["distinct training tokens in the corpus", f"{c0['budget_data']['corpus_train_tokens']:,}"],
      ["held-out targets per length", f"{c0['eval']['targets']:,} (identical at every length)"],
      ["seeds", ", ".join(str(s) for s in sorted({c['seed'] for c in cells}))],
      ["window's receptive field, L x (W - 1)", findings.receptive_field_text(model)],
      ["variants with the same pattern in every layer (the same model)", findings.same_patterns_text(runs)],
      ["claims judged on", metric.name],
  ])
  lines += text_sections(runs, multiples) if text else [
      "", "## Perplexity by length", "",
      "Not shown: these runs trained on a synthetic task alone, so perplexity on held-out text says nothing "
      "about them (their text loss is that of a model that never saw text). Recall by distance, below, is "
      "their measure.", ""]
  lines += passkey_section(runs) + budget_section(runs, multiples, text) + alpha_section(runs)
  lines += latency_section(latency) + cost_section(root, everything)
  lines += unfinished_section(root, everything) + found.lines + findings.noise_section(runs, reruns, metric, multiples)
  verdicts = claims(runs, latency, metric)
  lines += ["## The paper's claims", "", TASK_RULE if metric.task else RULE, ""]
  lines += table(["claim", "paper", "ours (this scale)", "verdict"],
                 [[c["claim"], c["paper"], c["ours"], f"**{c['verdict']}**"] for c in verdicts])
  lines += ["", f"Scale of these verdicts: {model['d_model']}-wide, {model['num_layers']}-layer models, "
            f"{c0['budget_data']['training_tokens']:,} training tokens each; the paper's models are ~60M parameters "
            "trained on 426M tokens.", ""]
  lines += findings.power_section(findings.claim_comparisons(verdicts) + found.comparisons)
  return "\n".join(lines), verdicts, found


def text_sections(runs: dict, multiples: tuple[int, ...]) -> list[str]:
  """Held-out text perplexity by length and the loss by context position (runs that trained on text)."""
  lines = ["", "## Perplexity by length (held-out, mean +- std over seeds)", ""]
  rows = []
  for v in sorted(runs):
    cs = list(runs[v].values())
    rise = rise_interval(runs, v)
    rows.append([v, str(len(cs))] + [mean_std([ppl(c, m) for c in cs]) for m in multiples] + [fmt_pct(rise)])
  lines += table(["variant", "n"] + [f"ppl {m}x T" for m in multiples] + ["rise 4x vs 1x [95% CI]"], rows)
  return lines + ["", "![perplexity by length](plots/ppl_by_length.png)", "",
                  "## Loss by context position", "",
                  "Mean held-out loss in equal spans of the window, at each length (same targets at every length).", "",
                  "![loss by position](plots/loss_by_position.png)", ""]


def passkey_section(runs: dict) -> list[str]:
  lines = ["## Passkey retrieval", "",
           "Accuracy by context length, over key depths and seeds: the whole key right (greedy, teacher-forced), "
           "each digit right (chance is about 0.1); "
           "`reachable`: fraction of trials whose key-to-question distance the pattern can bridge in principle "
           "(window plus offsets, through the layers).", ""]
  rows = []
  for v in sorted(runs):
    cells = [c for c in runs[v].values() if "passkey" in c]
    if not cells:
      continue
    by_len: dict[int, list[tuple[float, float, float]]] = {}
    for c in cells:
      for x in c["passkey"]["cells"]:
        by_len.setdefault(x["length"], []).append((x["accuracy"], x["token_accuracy"], x["reachable"]))
    rows.append([v] + [" / ".join(f"{stats.mean([t[i] for t in by_len[n]]):.2f}" for i in range(3))
                       for n in sorted(by_len)])
    header = ["variant"] + [f"length {n}: key / digit accuracy / reachable" for n in sorted(by_len)]
  if not rows:
    return lines[:2] + ["Not run for these runs (`python -m train.passkey --workdir RUN`).", ""]
  return lines + table(header, rows) + ["", "![passkey](plots/passkey.png)", ""]


def budget_section(runs: dict, multiples: tuple[int, ...], text: bool = True) -> list[str]:
  """Held-out text perplexity of each trained model under cheaper patterns (runs that trained on
  text; a model trained on a task alone has no text perplexity worth comparing)."""
  lines = ["## Sparsity budget against length", "",
           "The trained weights evaluated with cheaper patterns (`train.probe.budget`); perplexity relative to the "
           "full pattern at the same length, mean over seeds.", ""]
  if not text:
    return lines[:2] + ["Not shown: these runs trained on a synthetic task alone (see Perplexity by length).", ""]
  rows, header = [], None
  for v in sorted(runs):
    cells = [c for c in runs[v].values() if "budget" in c]
    if not cells:
      continue
    budgets = cells[0]["budget"]["budgets"]
    header = ["variant", "budget", "keys/query"] + [f"{m}x T" for m in multiples]
    for name, b in budgets.items():
      rel = [stats.mean([c["budget"]["budgets"][name][f"{m}x"]["ppl"] / c["budget"]["budgets"]["full"][f"{m}x"]["ppl"]
                         - 1 for c in cells]) for m in multiples]
      rows.append([v, name, f"{b['keys_per_query']:.1f}"] + [f"{100 * r:+.2f}%" for r in rel])
  if not rows:
    return lines[:2] + ["Not measured for these runs (`python -m train.budget --workdir RUN`).", ""]
  return lines + table(header, rows) + ["", "![budget](plots/budget.png)", ""]


def alpha_section(runs: dict) -> list[str]:
  """Each learned variant's trained alpha per layer (``train.probe.alpha``), mean +- std over seeds,
  beside where it started; nothing for a root without a learned run's alpha record."""
  rows = []
  for v in sorted(runs):
    cells = [c for c in runs[v].values() if "alpha" in c]
    for layer in range(len(cells[0]["alpha"]["alpha"]) if cells else 0):
      alphas = [c["alpha"]["alpha"][layer] for c in cells]
      start = cells[0]["alpha"]["alpha_0"][layer]
      moved = stats.mean([abs(a / start - 1) for a in alphas])
      rows.append([v, str(layer), str(len(cells)), f"{start:.3f}", mean_std(alphas), f"{100 * moved:.1f}%"])
  if not rows:
    return []
  return (["## Learned alpha", "",
           "Each layer's trained alpha (`train.probe.alpha`: its offsets are alpha times the base terms), mean +- "
           "std over seeds, beside its initial alpha_0; `moved`: the mean over seeds of |alpha / alpha_0 - 1|. A "
           "learned schedule that barely moves is a static one.", ""]
          + table(["variant", "layer", "n", "alpha_0", "trained alpha", "moved"], rows) + [""])


def latency_section(latency: dict | None) -> list[str]:
  if not latency:
    return ["## Latency", "", "Not measured for this root (`python -m train.latency ROOT`).", ""]
  rows = [[v, f"{x['forward_1x_ms']:.3f}", f"{x['forward_4x_ms']:.3f}", f"{x['decode_ms_per_token']:.4f}"]
          for v, x in latency["variants"].items()]
  return (["## Latency", "", f"Batch 1, median of {latency['repeats']} after warm-up, {latency['device']} "
           f"(jax {latency['jax']}), {latency.get('weights', 'trained')} weights, measured alone by "
           f"`python -m train.latency` (`{latency.get('file', sweeproot.LATENCY)}`, the last one it wrote here)."
           + ("" if latency.get("decode_context") == "T" else
              " Its decode times predate `decode_context`: each timed call decoded further into one cache, so a "
              "dense model's context grew with the repeats and its decode time is overstated (sparse models' ring "
              "caches cost the same at any position); measure again for the dense row."), ""]
          + table(["variant", "forward T (ms)", "forward 4T (ms)", "decode (ms/token)"], rows)
          + ["", "![latency](plots/latency.png)", ""])


def sweep_calls(root: pathlib.Path) -> list[dict]:
  """One record per sweep invocation (``sweep_cost.jsonl``), oldest first; none without the file."""
  path = root / sweeproot.COST
  if not path.exists():
    return []
  return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def unfinished_cells(root: pathlib.Path, cells: list[dict]) -> list[str]:
  """The cells of ``root`` with a run folder or a log but no ``cell.json``, sorted."""
  finished = {c["name"] for c in cells}
  return sorted(({p.parent.name for p in root.glob(f"*/{rundir.CONFIG}")}
                 | {p.stem for p in (root / sweeproot.LOGS).glob("*.log")}) - finished)


def unfinished_section(root: pathlib.Path, cells: list[dict]) -> list[str]:
  """The cells of ``root`` without ``cell.json`` (a run folder or a log, no record), each with its
  log: the tables leave them out, so they are named here."""
  logs = root / sweeproot.LOGS
  names = unfinished_cells(root, cells)
  if not names:
    return []
  calls = sweep_calls(root)
  failed_last = set(calls[-1].get("failed_cells", [])) if calls else set()
  rows = [[f"`{n}`", "failed in the last sweep" if n in failed_last else "not finished",
           f"[`{sweeproot.LOGS}/{n}.log`]({sweeproot.LOGS}/{n}.log)" if (logs / f"{n}.log").exists() else "no log"]
          for n in names]
  return (["## Unfinished cells", "",
           f"{len(names)} cell(s) hold no `{rundir.CELL}`, so the tables above leave them out; their logs say why. "
           "Running the sweep again resumes them.", ""] + table(["cell", "state", "log"], rows) + [""])


def finished_and_failed(call: dict, root: pathlib.Path, cells: list[dict], last: bool) -> list[str]:
  """One invocation's "cells finished" and "failed" columns. A cell the last invocation recorded as
  failed that holds ``cell.json`` now was finished since, outside a sweep: it counts as finished,
  marked so (an earlier invocation's failed cells were resumed by the later ones, which count them).
  A record without ``failed_cells`` holds a count only: its cells all finished since when no cell
  of the root is unfinished."""
  names, finished = call.get("failed_cells"), {c["name"] for c in cells}
  if not last:
    since = 0
  elif names is None:
    since = 0 if unfinished_cells(root, cells) else call["failed"]
  else:
    since = sum(n in finished for n in names)
  done = str(call["cells_run"])
  if since:
    done = f"{call['cells_run'] + since} ({since} recorded as failed, `{rundir.CELL}` written since)"
  still = [n for n in names or [] if not (last and n in finished)]
  return [done, f"{len(still)} ({', '.join(still)})" if still else str(call["failed"] - since)]


def cost_section(root: pathlib.Path, cells: list[dict]) -> list[str]:
  calls = sweep_calls(root)
  if not calls:
    return []
  wall = sum(c["wall_s"] for c in calls)
  tokens = sum(c["budget_data"]["training_tokens"] for c in cells)
  rows = [[str(i + 1), f"{c['wall_s']:.0f}", *finished_and_failed(c, root, cells, i == len(calls) - 1),
           str(c["gpus"]), str(c["per_gpu"]) if c["gpus"] and c["per_gpu"] else "- (one cell at a time)"]
          for i, c in enumerate(calls)]
  return (["## The sweep's own cost", "",
           f"{len(cells)} runs, {tokens:,} training tokens in {wall:.0f} s of sweep wall time over {len(calls)} "
           f"invocation(s): {tokens / max(wall, 1e-9):,.0f} training tokens/s in total (wall time includes "
           f"evaluation and probes). Mean training time per run: {stats.mean([c['train_s'] for c in cells]):.0f} s.",
           ""] + table(["invocation", "wall s", "cells finished", "failed", "GPUs", "cells per GPU"], rows) + [""])


def summary(results: dict[str, list[dict]], facts: dict[str, findings.Findings] | None = None) -> str:
  """SUMMARY.md: each claim's verdict per root (``results``: ``{root: claims}``), and with ``facts``
  (``{root: findings}``) each root's validity checks and what no paper measured."""
  roots = list(results)
  rows = []
  for i, c in enumerate(results[roots[0]]):
    vs = [results[r][i]["verdict"] for r in roots]
    note = "scales agree" if len(set(vs)) == 1 else "**scales differ**"
    rows.append([c["claim"]] + vs + [note])
  rows += findings.summary_rows(roots, facts) if facts else []
  built = (f"Built by `python -m train.report {' '.join(roots)} --summary ...` from each root's runs; details in "
           "each root's report.md.")
  return "\n".join([SUMMARY_MARK, "# Verdicts across scales", "", built, ""]
                   + table(["claim"] + roots + ["across scales"], rows)
                   + (findings.at_t_block(roots, facts) + findings.summary_block(roots, facts) if facts else [])) + "\n"


def main(argv: list[str] | None = None) -> int:
  parser = ArgumentParser(description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("roots", nargs="+", type=pathlib.Path)
  parser.add_argument("--summary", type=pathlib.Path, default=None,
                      help="also write the verdicts of all roots to this new file")
  parser.add_argument("--force", action="store_true", help="replace a --summary file this command wrote earlier")
  return run_command(report, parser, argv)


def report(args: argparse.Namespace) -> int:
  """Writes each root's report (and the summary) and says where."""
  check_summary(args.summary, args.force)
  for root in args.roots:  # every root before any report is built
    check_root(root)
    check_writable(root, "the sweep root")
  results, facts = {}, {}
  for root in args.roots:
    text, verdicts, facts[str(root)] = build(root)
    write_whole(root / sweeproot.REPORT, text)
    results[str(root)] = verdicts
    print(f"wrote {root / sweeproot.REPORT}")
  if args.summary:
    write_whole(args.summary, summary(results, facts))
    print(f"wrote {args.summary}")
  return 0


def check_summary(path: pathlib.Path | None, force: bool = False) -> None:
  """Raises ``ValueError`` when ``--summary`` cannot be written as a file, or names a file this
  command did not write (it never replaces another file) or, without ``force``, one it did (checked
  before any report is written)."""
  if path is None:
    return
  if path.is_dir():
    raise ValueError(f"--summary {path} is a folder: give a file path, e.g. {path / 'SUMMARY.md'}")
  if not path.parent.is_dir():
    raise ValueError(f"--summary {path}: its folder {path.parent} does not exist; create it or give another path")
  if not path.exists():
    return
  try:
    with path.open("rb") as f:
      ours = f.readline().rstrip(b"\r\n") == SUMMARY_MARK.encode()
  except OSError as e:
    raise ValueError(f"--summary {path} cannot be read ({e.strerror or type(e).__name__}): give another path") from e
  if not ours:
    raise ValueError(f"--summary {path} exists and was not written by python -m train.report (its first line is not "
                     f"{SUMMARY_MARK!r}); it is never replaced: give a new file's path")
  if not force:
    raise ValueError(f"--summary {path} holds a summary written earlier: add --force to replace it, or give a new "
                     "file's path")

if __name__ == "__main__":
  exit_with(main())
