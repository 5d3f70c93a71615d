"""What a sweep's report states beyond the paper's six claims, and the comparisons it shares with them.

SPEC section 2 ("Making the comparison discriminating") asks every study for controls, workloads
where distance matters, text of other genres and the noise of its comparisons. From the files the
cells wrote (``train.study.experiment.probe_cell``) this module builds:

- the metric a root is judged on (``metric_of``): held-out loss, or recall error for a root whose
  runs trained on a synthetic task alone;
- per-seed paired comparisons with their 95% interval (``paired``), in a ``Unit`` that says how
  they are written and which difference a power statement plans for;
- the report's sections (``sections``): recall by distance (and its plot), out-of-distribution
  text, the extrapolation premise, the controls and the validity checks; after the claims, the
  statistical power of every comparison (``power_section``) and the spread of same-seed reruns beside
  the spread over seeds (``noise_section``);
- what ``--summary`` adds per root (``summary_rows``, ``summary_block``).

Nothing here imports ``train.study.report``: the report imports this module.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
from typing import TYPE_CHECKING, Callable, Sequence

from train.study import stats

if TYPE_CHECKING:  # matplotlib is imported only when plotting
  from matplotlib.figure import Figure

LEVEL_MAX = 0.02  # two variants are "level" when the 95% interval of their loss gap lies in +-0.02 nats
RECALLED_MIN = 0.5  # a reached (seed, distance) pair counts as recalled from this accuracy up
INERT_MAX = 0.01  # learned alpha is "inert" when its 95% interval is not more than 0.01 nats better
RECALL_LEVEL = 0.02  # on recall error: "level" and "inert" within 2 percentage points of accuracy
DENSE_RECALL_MIN = 0.90  # validity: dense recalls at least 90% of the answers at T
NEAR_CHANCE = 0.05  # validity: `window` recalls at most 5% of the answers beyond its receptive field
DENSE_CHECK = "dense recalls at T"  # the first validity check of a task study
STARVED_SPAN = 0.25  # validity on text: the window alone reaches at most this fraction of T through the layers
CONTROLS = ("window", "fib-random", "pow2-random")  # patterns every schedule must beat; no part of the claims
CONTROL_REFERENCES = ("fib-linear", "dense")  # what each control is compared with
OOD_PAIRS = (("fib-linear", "fib-fixed"), ("fib-linear", "window"))  # compared on each other-genre text
SINK = ":sink"  # a probe key's suffix: dense evaluated with a sliding window of T keys plus sink tokens
SINK_LABEL = " + sink window"


# ----------------------------------------------------------------------------- reading the cells


def loss(cell: dict, m: int = 1, key: str = "eval") -> float:
  """Held-out loss (nats) of ``cell`` at ``m`` x T from its evaluation ``key`` (``eval``, ``ood:<source>``,
  each with ``:sink`` for dense's sliding-window evaluation)."""
  return cell[key][f"{m}x"]["loss"]


def ppl(cell: dict, m: int = 1, key: str = "eval") -> float:
  return cell[key][f"{m}x"]["ppl"]


def recall_error(cell: dict, m: int = 1, key: str = "recall") -> float:
  """1 - the fraction of answers ``cell`` recalls exactly at ``m`` x T (``recall`` or ``recall:sink``)."""
  return 1.0 - cell[key][f"{m}x"]["accuracy"]


def ppl_rise(cell: dict, m: int) -> float:
  """Relative perplexity at ``m`` x T against T (identical targets)."""
  return ppl(cell, m) / ppl(cell, 1) - 1


def recall_drop(cell: dict, m: int) -> float:
  """Recall accuracy at T minus at ``m`` x T."""
  return recall_error(cell, m) - recall_error(cell, 1)


def position_losses(cell: dict) -> list[float]:
  """Held-out loss at T in equal spans of context position, nearest first."""
  return cell["eval"]["1x"]["bucket_loss"]


def distance_errors(cell: dict) -> list[float]:
  """Recall error at T per key-to-query distance bucket, nearest first."""
  return [1.0 - b["accuracy"] for b in cell["recall"]["1x"]["by_distance"]]


# ----------------------------------------------------------------------------- units and paired comparisons


def fmt_nats(d: dict | None) -> str:
  if d is None:
    return "n/a (runs missing)"
  return (f"{d['mean']:+.4f} nats [{d['lo']:+.4f}, {d['hi']:+.4f}] (ppl {100 * math.expm1(d['mean']):+.2f}%, "
          f"n={d['n']})")


def fmt_pct(d: dict | None, suffix: str = "%") -> str:
  """A relative difference (or, with ``suffix`` " points", an accuracy difference) in percent."""
  if d is None:
    return "n/a"
  return f"{100 * d['mean']:+.1f}{suffix} [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}] (n={d['n']})"


@dataclasses.dataclass(frozen=True)
class Unit:
  """How differences of one kind are written, and the difference a power statement plans for."""
  name: str
  scale: float  # written as scale x value
  digits: int
  suffix: str
  effect: float  # the true difference an 80%-power test is planned for, in this unit
  effect_text: str
  describe: Callable[[dict | None], str]  # an interval (``interval``) as text

  def num(self, x: float, signed: bool = True) -> str:
    return f"{self.scale * x:{'+' if signed else ''}.{self.digits}f}{self.suffix}"


NATS = Unit("nats", 1.0, 4, " nats", stats.ppl_effect(0.005), "0.5% perplexity", fmt_nats)
RATIO = Unit("relative perplexity", 100.0, 2, "%", 0.005, "0.5% perplexity", fmt_pct)
POINTS = Unit("percentage points", 100.0, 1, " points", RECALL_LEVEL, "2 recall points",
              functools.partial(fmt_pct, suffix=" points"))


def interval(diffs: Sequence[float], unit: Unit, label: str) -> dict:
  """Per-seed differences ``diffs``: n, mean and 95% t interval, with the differences, their unit and a label."""
  m, lo, hi = stats.interval95(diffs)
  return {"n": len(diffs), "mean": m, "lo": lo, "hi": hi, "diffs": list(diffs), "unit": unit, "label": label}


def paired(runs: dict, a: str, b: str, value: Callable[[dict], float] = loss, unit: Unit = NATS,
           relative: bool = False, label: str | None = None) -> dict | None:
  """``value(a) - value(b)`` (``relative``: ``value(a) / value(b) - 1``) over the seeds both variants
  have (``runs``: ``{variant: {seed: cell}}``), with its interval; ``None`` without a common seed."""
  if a not in runs or b not in runs:
    return None
  seeds = sorted(set(runs[a]) & set(runs[b]))
  if not seeds:
    return None
  diffs = stats.paired_differences([value(runs[a][s]) for s in seeds], [value(runs[b][s]) for s in seeds], relative)
  return interval(diffs, unit, label or (f"{a} / {b} - 1" if relative else f"{a} - {b}"))


# ----------------------------------------------------------------------------- the metric a root is judged on


@dataclasses.dataclass(frozen=True)
class Metric:
  """What the claims compare: a per-run value at ``m`` x T (lower is better), its change with length
  (claim 4) and its profile over near-to-far buckets at T (claim 6), with the thresholds of "level"
  and "inert"."""
  name: str
  task: bool
  key: str  # the probe it reads; ``key + SINK``: dense with a sliding window
  read: Callable[[dict, int, str], float]
  unit: Unit
  change: Callable[[dict, int], float]
  change_unit: Unit
  change_name: str
  profile: Callable[[dict], list[float]]
  profile_name: str
  level: float
  inert: float

  def of(self, cell: dict, m: int = 1, sink: bool = False) -> float:
    """The value of ``cell`` at ``m`` x T (``sink``: from dense's sliding-window evaluation)."""
    return self.read(cell, m, self.key + (SINK if sink else ""))

  def at(self, m: int) -> Callable[[dict], float]:
    """The value at ``m`` x T as a function of a cell (``sink_or_plain``: dense with its sliding window)."""
    return functools.partial(self.of, m=m)


LOSS = Metric("held-out loss", False, "eval", loss, NATS, ppl_rise, RATIO, "perplexity rise", position_losses,
              "context position", LEVEL_MAX, INERT_MAX)
RECALL = Metric("recall error", True, "recall", recall_error, POINTS, recall_drop, POINTS, "recall accuracy drop",
                distance_errors, "key-to-query distance", RECALL_LEVEL, RECALL_LEVEL)


def metric_of(cells: list[dict]) -> Metric:
  """``RECALL`` for runs that trained on a synthetic task alone (``task`` set, ``task_mix`` 1), else
  ``LOSS``; raises ``ValueError`` naming a task run that has no recall probe."""
  cfg = cells[0]["config"]
  if cfg.get("task") is None or cfg.get("task_mix", 1.0) < 1:
    return LOSS
  missing = [c["name"] for c in cells if RECALL.key not in c]
  if missing:
    raise ValueError(f"{', '.join(missing)} trained on task {cfg['task']} but their cell.json names no recall probe: "
                     "remove those cell.json files and run the sweep again (it runs the missing probe)")
  return RECALL


def sink_or_plain(metric: Metric, m: int) -> Callable[[dict], float]:
  """The value at ``m`` x T, dense's read with its sliding window (the fair baseline beyond T)."""
  return lambda c: metric.of(c, m, sink=c["variant"] == "dense")


# ----------------------------------------------------------------------------- markdown and plots


def table(header: list[str], rows: list[list[str]]) -> list[str]:
  return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def mean_std(xs: list[float], fmt: str = "{:.3f}") -> str:
  return f"{fmt.format(stats.mean(xs))} +- {fmt.format(stats.std(xs))}"


def seeds_text(xs: list[float]) -> str:
  """``mean +- sd`` over seeds; the value alone for one seed (no spread to state); ``-`` for none."""
  return mean_std(xs) if len(xs) > 1 else f"{xs[0]:.3f}" if xs else "-"


def save(fig: Figure, path: pathlib.Path) -> None:
  """Writes ``fig`` to ``path`` (PNG, 110 dpi) and closes it."""
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  import matplotlib.pyplot as plt  # noqa: PLC0415

  plt.close(fig)


def receptive_field(model: dict) -> int:
  """How far the local window alone reaches through every layer: L x (W - 1) tokens."""
  return model["num_layers"] * (model["window"] - 1)


def receptive_field_text(model: dict) -> str:
  rf, t = receptive_field(model), model["seq_len"]
  return f"{rf} of T = {t} ({rf / t:.2f} T)"


def same_patterns(runs: dict) -> list[tuple[str, ...]]:
  """Groups of variants (``runs``: ``{variant: {seed: cell}}``) whose static patterns are the same
  in every layer at this recipe's depth, window and reach (``fibjax.model.layer_patterns``), e.g.
  ``pow2-fixed`` and ``pow2-linear`` at 2 layers, where alpha 0.5 and 2 move no power of 2 out of
  ``[W, R)``: such variants train the same model, so their comparisons measure nothing. Learned
  and random patterns are left out (trained or drawn per seed)."""
  from fibjax.model import ModelConfig, layer_patterns  # noqa: PLC0415  (imports jax)

  by_pattern: dict[tuple, list[str]] = {}
  for v in sorted(runs):
    model = next(iter(runs[v].values()))["config"]["model"]
    if v.endswith(("-learned", "-random")):
      continue
    keys = tuple((p.kind, p.window, p.reach, p.offsets) for p in layer_patterns(ModelConfig(**model)))
    by_pattern.setdefault(keys, []).append(v)
  return [tuple(vs) for vs in by_pattern.values() if len(vs) > 1]


def same_patterns_text(runs: dict) -> str:
  groups = same_patterns(runs)
  return "; ".join(" = ".join(g) for g in groups) if groups else "none"


def with_sink(runs: dict, key: str) -> dict[str, list[dict]]:
  """``{row label: cells}`` of every variant whose cells hold probe ``key``, and beside dense its
  sliding-window evaluation (``key + SINK``, labelled ``dense + sink window``)."""
  rows = {}
  for v in sorted(runs):
    for suffix, label in (("", v), (SINK, v + SINK_LABEL)):
      cells = [c for c in runs[v].values() if key + suffix in c]
      if cells:
        rows[label] = cells
  return rows


def row_key(label: str, key: str) -> str:
  """The probe key a ``with_sink`` row reads."""
  return key + SINK if label.endswith(SINK_LABEL) else key


# ----------------------------------------------------------------------------- recall by distance


def recall_multiples(runs: dict) -> tuple[int, ...]:
  """The lengths (multiples of T) the recall probes ran at (none without one)."""
  cells = [c for v in runs.values() for c in v.values() if RECALL.key in c]
  return tuple(sorted(set(cells[0][RECALL.key]["multiples"]))) if cells else ()


@functools.lru_cache(maxsize=None)
def _static_hops(model_json: str, sink_window: bool):
  """The one-hop distance sets per layer of the model ``model_json`` (``train.probe.reach.config_hop_sets``),
  once per model; ``None`` for a learned pattern."""
  from train.probe import reach  # noqa: PLC0415  (imports jax)

  return reach.config_hop_sets(json.loads(model_json), sink_window)


def static_reach(model_json: str, sink_window: bool, lo: int, hi: int) -> tuple[float, float] | None:
  """``(one_hop, layers)`` of the answer distances ``[lo, hi)`` under the static pattern of the model
  ``model_json`` (a ``config.json``'s ``model``, as JSON; ``sink_window``: dense read through its
  sliding window of T keys), by ``train.probe.recall.reach_by_bucket``; ``None`` for a learned pattern."""
  from train.probe import recall  # noqa: PLC0415  (imports jax)

  hops = _static_hops(model_json, sink_window)
  if hops is None:
    return None
  r = recall.reach_by_bucket(hops, [lo, hi])[0]
  return r["one_hop"], r["layers"]


def pattern_reach(cell: dict, key: str, m: int) -> dict[tuple[int, int], tuple[float, float]]:
  """Per distance bucket of ``cell``'s recall probe ``key`` at ``m`` x T: ``(one_hop, layers)``, the
  fractions of its distances the pattern reaches in one hop and through all layers. A static pattern's
  (dense, window, a schedule, random offsets) come from the cell's ``config.json`` (``static_reach``);
  a learned pattern's offsets are trained parameters, so its fractions are those the probe stored."""
  model = json.dumps(cell["config"]["model"], sort_keys=True)
  out = {}
  for b in cell[key][f"{m}x"]["by_distance"]:
    lo, hi = b["distance"]
    out[(lo, hi)] = static_reach(model, key.endswith(SINK), lo, hi) or (b["one_hop"], b["layers"])
  return out


def recall_buckets(cells: list[dict], key: str, m: int) -> list[dict]:
  """Per key-to-query distance bucket at ``m`` x T, nearest first: ``distance`` ``(lo, hi)``, the mean
  ``accuracy`` over the cells that have the bucket (``seeds`` of them), and the mean over those cells
  of the pattern's reach fractions ``one_hop`` and ``layers`` (``pattern_reach``; random offsets
  differ per seed)."""
  acc: dict[tuple[int, int], list[float]] = {}
  reach: dict[tuple[int, int], list[tuple[float, float]]] = {}
  for c in cells:
    fractions = pattern_reach(c, key, m)
    for b in c[key][f"{m}x"]["by_distance"]:
      k = (b["distance"][0], b["distance"][1])
      acc.setdefault(k, []).append(b["accuracy"])
      reach.setdefault(k, []).append(fractions[k])
  return [{"distance": k, "accuracy": stats.mean(acc[k]), "seeds": len(acc[k]),
           "one_hop": stats.mean([r[0] for r in reach[k]]), "layers": stats.mean([r[1] for r in reach[k]])}
          for k in sorted(acc)]


def reached_or_not(cells: list[dict], m: int = 1) -> dict[str, list[float]]:
  """The recall accuracies at ``m`` x T of every (cell, distance bucket) of ``cells``, split by the
  pattern's reach through all layers (``pattern_reach``): ``reached`` (all of the bucket),
  ``unreached`` (none of it) and ``partly``; and the reached ones again by how: ``one_hop`` (every
  distance in one hop: an offset or the window of one layer) and ``layers_only`` (none in one hop,
  every one through the layers: a path of several hops)."""
  out: dict[str, list[float]] = {"reached": [], "unreached": [], "partly": [], "one_hop": [], "layers_only": []}
  for c in cells:
    fractions = pattern_reach(c, RECALL.key, m)
    for b in c[RECALL.key][f"{m}x"]["by_distance"]:
      one_hop, layers = fractions[(b["distance"][0], b["distance"][1])]
      out["reached" if layers == 1 else "unreached" if layers == 0 else "partly"].append(b["accuracy"])
      if layers == 1 and one_hop in (0, 1):
        out["one_hop" if one_hop == 1 else "layers_only"].append(b["accuracy"])
  return out


def reach_splits(runs: dict) -> dict[str, dict[str, list[float]]]:
  """``reached_or_not`` at 1x T of each variant but dense with a recall probe."""
  out = {}
  for v in sorted(runs):
    cells = [c for c in runs[v].values() if RECALL.key in c]
    if v != "dense" and cells:
      out[v] = reached_or_not(cells)
  return out


def reach_table(runs: dict) -> list[str]:
  """Per variant but dense, at 1x T: mean recall accuracy over the (seed, bucket) pairs its pattern
  reaches through all layers and over those it does not, with their counts; the reached pairs
  again split into those reached in one hop and those reached only through several."""
  def accuracy(values: list[float]) -> str:
    return f"{stats.mean(values):.3f} ({len(values)})" if values else "- (0)"

  def recalled(values: list[float]) -> str:
    return f"{sum(a >= RECALLED_MIN for a in values)} of {len(values)}"

  rows = []
  for v, split in reach_splits(runs).items():
    cells = [c for c in runs[v].values() if RECALL.key in c]
    rows.append([v, str(len(cells)), accuracy(split["reached"]), accuracy(split["unreached"]),
                 recalled(split["reached"]), *(f"{accuracy(split[k])}, {recalled(split[k])}"
                                               for k in ("one_hop", "layers_only")), str(len(split["partly"]))])
  if not rows:
    return []
  return (["### Recall where the pattern reaches and where it does not", "",
           "At 1x T, per variant: mean recall accuracy over every (seed, distance bucket) whose distances the "
           "seed's pattern reaches through all layers (layers = 1) and over those it reaches none of (layers = 0), "
           "the count of such pairs in brackets (reach as in the table above: per seed for random offsets); buckets "
           "partly reached are counted apart and left out. Recall that follows the predicted reach is high in the "
           f"first column and near chance in the second. `recalled` counts the reached pairs whose accuracy is at "
           f"least {RECALLED_MIN}: how much of its reach a model learned to use (the mean alone does not tell a "
           "model that recalls every reached distance half the time from one that recalls half of them always). "
           "The reached pairs again, by how the pattern reaches them: in one hop (an offset, or one layer's "
           "window, spans the whole copy: one hop = 1) or only through the layers (a path of several hops: one hop "
           "= 0); pairs reached partly in one hop are in neither.", ""]
          + table(["variant", "n", "reached: accuracy (buckets)", "not reached: accuracy (buckets)",
                   "reached: recalled", "in one hop: accuracy (buckets), recalled",
                   "only through layers: accuracy (buckets), recalled", "partly reached (buckets)"], rows) + [""])


def bucket_text(distance: tuple[int, int]) -> str:
  """A distance bucket ``[lo, hi)`` as text; a bucket of one distance (a grid's) as that distance."""
  return str(distance[0]) if distance[1] == distance[0] + 1 else f"[{distance[0]}, {distance[1]})"


def recall_section(runs: dict) -> list[str]:
  multiples = recall_multiples(runs)
  if not multiples:
    return []
  rows = with_sink(runs, RECALL.key)
  lines = ["## Recall by distance", "",
           "Recall accuracy (an answer counts when every one of its tokens is the greedy prediction) by key-to-query "
           "distance bucket [lo, hi), mean over seeds; in brackets the fractions of the bucket's distances d the "
           "pattern reaches in one hop (one layer's window or an offset) and through all layers (`train.probe.reach`), "
           "each read at the relative distance d - 1 the copy spans (`train.probe.recall.reach_by_bucket`). For a "
           "static pattern (dense, window, a schedule, random offsets) they are computed from each run's "
           "`config.json`, mean over seeds (random offsets differ per seed); a learned pattern's offsets are trained "
           "parameters, so its fractions are those its recall probe stored (a record written before the probe read "
           f"reach at d - 1 states them at d). `dense{SINK_LABEL}`: dense evaluated with a sliding window of T keys "
           "plus sink tokens.", ""]
  for m in multiples:
    buckets = sorted({b["distance"] for label, cells in rows.items()
                      for b in recall_buckets(cells, row_key(label, RECALL.key), m)})
    body = []
    for label, cells in rows.items():
      key = row_key(label, RECALL.key)
      found = {b["distance"]: b for b in recall_buckets(cells, key, m)}
      overall = stats.mean([c[key][f"{m}x"]["accuracy"] for c in cells])
      body.append([label, str(len(cells)), f"{overall:.3f}"] + [
          f"{found[d]['accuracy']:.3f} ({found[d]['one_hop']:.2f} / {found[d]['layers']:.2f})" if d in found else "-"
          for d in buckets])
    length = next(iter(rows.values()))[0][RECALL.key][f"{m}x"]["length"]
    lines += [f"### {m}x T ({length} tokens)", ""]
    lines += table(["variant", "n", "all"] + [f"{bucket_text(d)} (one hop / layers)" for d in buckets], body) + [""]
  return lines + reach_table(runs) + ["![recall by distance](plots/recall_by_distance.png)", ""]


def plot_recall(runs: dict, model: dict, out: pathlib.Path) -> None:
  """``out/recall_by_distance.png``: one panel per length, accuracy against the bucket midpoint (log
  axis), a line per variant (dense's sliding-window evaluation dashed); nothing without a recall probe."""
  multiples = recall_multiples(runs)
  if not multiples:
    return
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  from matplotlib.ticker import NullLocator  # noqa: PLC0415

  out.mkdir(exist_ok=True)
  rows = with_sink(runs, RECALL.key)
  fig, axes = plt.subplots(1, len(multiples), figsize=(4 * len(multiples), 3.5), sharey=True, squeeze=False)
  for ax, m in zip(axes[0], multiples):
    edges = set()
    for label, cells in rows.items():
      bs = recall_buckets(cells, row_key(label, RECALL.key), m)
      edges.update(e for b in bs for e in b["distance"])
      ax.plot([(b["distance"][0] + b["distance"][1]) / 2 for b in bs], [b["accuracy"] for b in bs], marker="o",
              label=label, linestyle="--" if label.endswith(SINK_LABEL) else "-")
    ax.axvline(receptive_field(model), color="grey", linewidth=0.8, linestyle=":")
    ax.set_xscale("log")
    ax.set_xticks(sorted(edges), [str(e) for e in sorted(edges)], fontsize=7)  # labelled at the bucket edges only
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set(xlabel="key-to-query distance (bucket midpoint)", title=f"{m}x T", ylim=(-0.02, 1.02))
  axes[0][0].set_ylabel("recall accuracy")
  axes[0][0].legend(fontsize=6, title="dotted: window's L x (W - 1)", title_fontsize=6)
  save(fig, out / "recall_by_distance.png")


# ----------------------------------------------------------------------------- validity checks


def validity(runs: dict, model: dict) -> list[dict]:
  """The study's validity checks (``check``, ``rule``, ``measured``, ``result``: pass, fail or not
  checked): on a task, ``recall_validity``; on text, ``text_validity``; none without either probe."""
  if recall_multiples(runs):
    return recall_validity(runs, model)
  if any("eval" in c for cells in runs.values() for c in cells.values()):
    return text_validity(runs, model)
  return []


def text_validity(runs: dict, model: dict) -> list[dict]:
  """A text study can tell schedules apart only where the offsets carry what the window cannot: the
  window alone spans at most ``STARVED_SPAN`` of T through the layers, and ``window`` is worse than
  ``fib-linear`` on held-out text at T (paired over seeds, the interval above 0)."""
  rf, t = receptive_field(model), model["seq_len"]
  span = {"check": "the window alone cannot span T",
          "rule": f"L x (W - 1) <= {STARVED_SPAN:g} T = {t * STARVED_SPAN:g}",
          "measured": f"{rf} tokens ({rf / t:.2f} T)", "result": "pass" if rf <= STARVED_SPAN * t else "fail"}
  used = {"check": "the offsets carry what the window cannot",
          "rule": "`window` minus `fib-linear` held-out loss at 1x T, paired over seeds: 95% interval above 0"}
  gap = paired(runs, "window", "fib-linear")
  if gap is None:
    used.update(measured="no window and fib-linear runs of a common seed", result="not checked")
  else:
    used.update(measured=fmt_nats(gap), result="pass" if gap["lo"] > 0 else "fail")
  return [span, used]


def recall_validity(runs: dict, model: dict) -> list[dict]:
  """Dense recalls at T, and ``window`` stays near chance beyond its receptive field."""
  multiples = recall_multiples(runs)
  dense = [c for c in runs.get("dense", {}).values() if RECALL.key in c]
  first = {"check": DENSE_CHECK,
           "rule": f"dense's recall accuracy at 1x T, mean over seeds, >= {DENSE_RECALL_MIN:.2f}"}
  if dense:
    accs = [c[RECALL.key]["1x"]["accuracy"] for c in dense]
    first.update(measured=f"{stats.mean(accs):.3f} (seeds {min(accs):.3f} to {max(accs):.3f}, n={len(accs)})",
                 result="pass" if stats.mean(accs) >= DENSE_RECALL_MIN else "fail")
  else:
    first.update(measured="no dense run with a recall probe", result="not checked")

  rf = receptive_field(model)
  second = {"check": "window stays near chance beyond its receptive field",
            "rule": (f"`window`'s recall accuracy, mean over seeds, <= {NEAR_CHANCE:.2f} in every distance bucket "
                     f"whose lower edge exceeds L x (W - 1) = {rf} tokens, at every length probed")}
  window = [c for c in runs.get("window", {}).values() if RECALL.key in c]
  beyond = [(m, b) for m in multiples for b in recall_buckets(window, RECALL.key, m) if b["distance"][0] > rf]
  if not window:
    second.update(measured="no window run with a recall probe", result="not checked")
  elif not beyond:
    second.update(measured=f"no bucket lies beyond {rf} tokens", result="not checked")
  else:
    m, worst = max(beyond, key=lambda mb: mb[1]["accuracy"])
    second.update(measured=f"at most {worst['accuracy']:.3f} ({bucket_text(worst['distance'])} at {m}x T; "
                           f"{len(beyond)} buckets)",
                  result="pass" if worst["accuracy"] <= NEAR_CHANCE else "fail")
  return [first, second]


def validity_verdict(checks: list[dict]) -> str:
  """One phrase: pass, fail (which checks), not established (which were not checked), or n/a."""
  if not checks:
    return "n/a (no recall or held-out text probe)"
  failed, unchecked = ("; ".join(c["check"] for c in checks if c["result"] == r) for r in ("fail", "not checked"))
  return f"fail: {failed}" if failed else f"not established ({unchecked}: not checked)" if unchecked else "pass"


def validity_section(checks: list[dict]) -> list[str]:
  lines = ["## Validity checks", ""]
  if not checks:
    return lines + ["Not made: no run of this root has a recall or held-out text probe.", ""]
  if checks[0]["check"] == DENSE_CHECK:  # a task study's checks
    lines += ["A study discriminates between patterns only when every check passes: dense can retrieve at T, and the "
              "window alone cannot retrieve beyond its reach, so that a gain there is the offsets' doing.", ""]
  else:
    lines += ["A text study discriminates between patterns only when every check passes: the window alone cannot "
              "span the context through the layers, and removing the offsets costs perplexity, so that the offsets "
              "carry information a schedule can place well or badly.", ""]
  lines += table(["check", "rule", "measured", "result"],
                 [[c["check"], c["rule"], c["measured"], f"**{c['result']}**"] for c in checks])
  verdict = validity_verdict(checks)
  if verdict == "pass":
    note = "Every check passes: the study discriminates between the patterns."
  elif verdict.startswith("fail"):
    note = (f"**This study does not discriminate between the patterns** ({verdict}). The verdicts below are stated as "
            "measured, but they do not show what the schedules change.")
  else:
    note = f"Whether this study discriminates between the patterns is {verdict}."
  return lines + ["", note, ""]


# ----------------------------------------------------------------------------- controls and out-of-distribution text


def control_comparisons(runs: dict, metric: Metric, multiples: Sequence[int]) -> list[dict]:
  """Each control minus each reference (``CONTROL_REFERENCES``) in ``metric`` at every length; dense
  with its sliding window (where measured) minus the best sparse variant (claims' variants only)."""
  out = []
  for ctrl in (c for c in CONTROLS if c in runs):
    for ref in CONTROL_REFERENCES:
      out += [paired(runs, ctrl, ref, metric.at(m), metric.unit, label=f"{ctrl} - {ref} at {m}x T")
              for m in multiples]
  best = best_sparse(runs, metric)
  if best and any(metric.key + SINK in c for c in runs["dense"].values()):
    out += [paired(runs, "dense", best, sink_or_plain(metric, m), metric.unit,
                   label=f"dense{SINK_LABEL} - {best} at {m}x T") for m in multiples]
  return [d for d in out if d is not None]


def best_sparse(runs: dict, metric: Metric) -> str | None:
  """The sparse variant of the claims (no control) with the lowest mean value at T; ``None`` without
  one or without dense."""
  sparse = [v for v in runs if v != "dense" and v not in CONTROLS]
  if "dense" not in runs or not sparse:
    return None
  return min(sparse, key=lambda v: stats.mean([metric.of(c) for c in runs[v].values()]))


def comparison_table(comparisons: list[dict], multiples: Sequence[int]) -> list[str]:
  """One row per comparison label (its ``at <m>x T`` tail dropped), one column per length."""
  rows: dict[str, dict[int, dict]] = {}
  for d in comparisons:
    name, _, at = d["label"].rpartition(" at ")
    rows.setdefault(name, {})[int(at.split("x")[0])] = d
  return table(["comparison"] + [f"{m}x T" for m in multiples],
               [[name] + [by_m[m]["unit"].describe(by_m[m]) if m in by_m else "-" for m in multiples]
                for name, by_m in rows.items()])


def controls_section(comparisons: list[dict], metric: Metric, multiples: Sequence[int]) -> list[str]:
  if not comparisons:
    return []
  return (["## Controls", "",
           f"Each control minus its reference, per seed (same data), in this root's metric ({metric.name}, in "
           f"{metric.unit.name}), mean and 95% t interval over seeds; negative: the first is better. "
           f"`dense{SINK_LABEL}` is dense evaluated with a sliding window of T keys plus sink tokens, against the best "
           "sparse variant of the claims (lowest mean at T).", ""]
          + comparison_table(comparisons, multiples) + [""])


def ood_sources(runs: dict) -> list[str]:
  return sorted({k.split(":")[1] for v in runs.values() for c in v.values() for k in c
                 if k.startswith("ood:") and not k.endswith(SINK)})


def ood_comparisons(runs: dict, multiples: Sequence[int]) -> list[dict]:
  """On each other-genre source at every length: ``OOD_PAIRS`` in held-out loss, and dense with its
  sliding window minus dense (per seed, the same run)."""
  out = []
  for source in ood_sources(runs):
    key = f"ood:{source}"
    for a, b in OOD_PAIRS:
      out += [paired(runs, a, b, functools.partial(loss, m=m, key=key), label=f"{a} - {b}, {source} at {m}x T")
              for m in multiples]
    dense = [c for c in runs.get("dense", {}).values() if key + SINK in c]
    if dense:
      out += [interval([loss(c, m, key + SINK) - loss(c, m, key) for c in dense], NATS,
                       f"dense{SINK_LABEL} - dense, {source} at {m}x T") for m in multiples]
  return [d for d in out if d is not None]


def ood_section(runs: dict, comparisons: list[dict], multiples: Sequence[int]) -> list[str]:
  sources = ood_sources(runs)
  if not sources:
    return []
  lines = ["## Out-of-distribution text", "",
           "Held-out text of other genres than the training corpus (`train.data.ood`), perplexity at each length, "
           "mean +- std over seeds.", ""]
  for source in sources:
    key = f"ood:{source}"
    rows = [[label, str(len(cells))] + [mean_std([ppl(c, m, row_key(label, key)) for c in cells]) for m in multiples]
            for label, cells in with_sink(runs, key).items()]
    lines += [f"### {source}", ""] + table(["variant", "n"] + [f"ppl {m}x T" for m in multiples], rows) + [""]
  if comparisons:
    lines += ["Paired per seed, held-out loss difference on each source, 95% t interval; negative: the first is "
              "better.", ""] + comparison_table(comparisons, multiples) + [""]
  return lines


# ----------------------------------------------------------------------------- the extrapolation premise


def stretch_budgets(cells: list[dict]) -> list[str]:
  """The budgets of ``cells`` that move the offsets beyond the distances seen in training, with ``full``."""
  names = cells[0]["budget"]["budgets"]
  return [n for n in names if n == "full" or n.startswith("stretch-")]


def trained_share(model: dict, budget: str) -> float | None:
  """The share of the offsets of the static pattern of ``model`` (a ``config.json``'s ``model``) under
  ``budget`` that land on distances its layer queried in training (inside its window or on one of
  its offsets), over all layers: for ``stretch-S``, how much of the moved pattern is not new at all
  (a power of 2 doubled is often another power of 2 of the same layer). ``None`` for a learned
  pattern (its trained distances are weights) or one without offsets."""
  from fibjax.model import ModelConfig, layer_patterns  # noqa: PLC0415  (imports jax)
  from train.probe.budget import cheaper  # noqa: PLC0415

  patterns = layer_patterns(ModelConfig(**model))
  if any(p.kind != "static" for p in patterns):
    return None
  moved = [(d, p) for p in patterns for d in cheaper(p, budget).offsets]
  return sum(d < p.window or d in p.offsets for d, p in moved) / len(moved) if moved else None


def extrapolation_section(runs: dict, multiples: Sequence[int]) -> list[str]:
  rows = []
  for v in sorted(runs):
    cells = [c for c in runs[v].values() if "budget" in c]
    if not cells or len(stretch_budgets(cells)) < 2:
      continue
    for name in stretch_budgets(cells):
      rises = [[c["budget"]["budgets"][name][f"{m}x"]["ppl"] / c["budget"]["budgets"]["full"]["1x"]["ppl"] - 1
                for c in cells] for m in multiples]
      shares = [trained_share(c["config"]["model"], name) for c in cells if "config" in c]
      known = [x for x in shares if x is not None]
      share = f"{stats.mean(known):.0%}" if known and len(known) == len(cells) else "-"
      rows.append([v, name, str(len(cells)), share] + [mean_std(r, "{:.2%}") for r in rises])
  if not rows:
    return []
  for label, cells in with_sink({"dense": runs.get("dense", {})}, "eval").items():
    key = row_key(label, "eval")
    rows.append([label, "-", str(len(cells)), "-"] + [mean_std([ppl(c, m, key) / ppl(c) - 1 for c in cells], "{:.2%}")
                                                      for m in multiples])
  return (["## Extrapolation premise", "",
           "The paper's premise: sparse models extrapolate because they only ever query relative positions seen in "
           "training. `stretch-S` moves every trained offset to S times its distance (the reach to S x R). "
           "`offsets on trained distances`: the share of the pattern's offsets, over layers and seeds, that land on "
           "a distance the same layer queried in training (its window or one of its offsets); only the rest are "
           "new, so a row with a high share does not test the premise (a power of 2 doubled is another of the same "
           "layer's powers of 2); `-` for learned patterns, whose distances are weights. Perplexity rise at each "
           "length against the same weights' full pattern at T (dense: against itself at T), mean +- std over "
           "seeds, held-out text.", ""]
          + table(["variant", "pattern", "n", "offsets on trained distances"] + [f"rise {m}x T" for m in multiples],
                  rows) + [""])


# ----------------------------------------------------------------------------- statistical power


def power_section(sources: list[tuple[str, list[dict]]]) -> list[str]:
  """Per paired comparison (``sources``: ``(where, comparisons)``): n, mean, sd, the 95% half-width
  (the smallest mean difference these seeds resolve), the difference detected with 80% power, and
  the seeds an 80%-power test of the unit's planned effect needs given the measured sd."""
  rows = []
  for where, comparisons in sources:
    for d in comparisons:
      if d is None:
        continue
      u = d["unit"]
      s = stats.paired_summary(d["diffs"], u.effect)
      rows.append([where, d["label"], str(s["n"]), u.num(s["mean"]), u.num(s["sd"], signed=False),
                   u.num(s["half"], signed=False), u.num(s["mde"], signed=False),
                   f"{s['seeds']} ({u.effect_text})" if s["seeds"] is not None else "n/a (one seed)"])
  if not rows:
    return []
  return (["## Statistical power", "",
           "Every paired comparison above: its seeds (n), mean per-seed difference and the sd of the differences; the "
           "95% interval's half-width, the smallest mean difference these seeds resolve (an observed mean at least "
           "this far from 0 excludes 0); the true difference a two-sided paired t test at 5% detects with 80% power "
           "at these seeds; and the seeds such a test of 0.5% perplexity (text; a loss difference of "
           f"{NATS.effect:.5f} nats) or of 2 recall points (task) needs given the measured sd (`train.study.stats`, "
           "exact noncentral t).", ""]
          + table(["from", "comparison", "n", "mean", "sd", "95% half-width", "80%-power difference",
                   "seeds for 80% power"], rows) + [""])


def noise_section(runs: dict, reruns: list[dict], metric: Metric, multiples: Sequence[int]) -> list[str]:
  """Per variant with same-seed reruns (``reruns``: the cells of ``ROOT/<variant>-s<seed>-rerun<k>``):
  the metric's spread over reruns of one seed beside its spread over seeds, at T and at the longest
  length; a comparison is resolvable only where both are small against the difference it measures."""
  by = {}
  for c in reruns:
    by.setdefault(c["variant"], []).append(c)
  rows = []
  for v in sorted(by):
    if c0 := runs.get(v, {}).get(by[v][0]["seed"]):
      row = [v, str(len(runs[v])), str(len(by[v]))]
      for m in (multiples[0], multiples[-1]):
        seeds = [metric.of(c, m) for c in runs[v].values()]
        gaps = [abs(metric.of(c, m) - metric.of(c0, m)) for c in by[v]]
        sd = stats.std(seeds) if len(seeds) > 1 else float("nan")  # no spread to state from one seed
        row += [metric.unit.num(sd, signed=False),
                "identical" if max(gaps) == 0 else metric.unit.num(max(gaps), signed=False)]
      rows.append(row)
  if not rows:
    return []
  lo, hi = multiples[0], multiples[-1]
  return (["## Rerun spread beside seed spread", "",
           f"The same cell trained again (same recipe, variant and seed; `train.sweep --reruns`) against the spread "
           f"over seeds: {metric.name} in {metric.unit.name}. \"identical\" means every rerun read exactly the same "
           "value (a deterministic run); a rerun gap near the seed sd means run-to-run noise, not the seed, sets "
           "what a comparison can resolve.", ""]
          + table(["variant", "seeds", "reruns", f"seed sd at {lo}x", f"largest rerun gap at {lo}x",
                   f"seed sd at {hi}x", f"largest rerun gap at {hi}x"], rows) + [""])


# ----------------------------------------------------------------------------- what no paper measured


def coprime_by_distance(runs: dict) -> list[dict]:
  """Per length and distance bucket: fib-coprime minus fib-linear recall accuracy (per seed, 95%
  interval) beside both patterns' reach through all layers; empty without both variants' recall."""
  pair = ("fib-coprime", "fib-linear")
  if not all(v in runs and all(RECALL.key in c for c in runs[v].values()) for v in pair):
    return []
  out = []
  for m in recall_multiples(runs):
    reach = {v: {b["distance"]: b["layers"] for b in recall_buckets(list(runs[v].values()), RECALL.key, m)}
             for v in pair}
    for d in sorted(reach[pair[0]].keys() & reach[pair[1]].keys()):
      acc = functools.partial(bucket_accuracy, m=m, distance=d)
      having = {v: {s: c for s, c in runs[v].items() if acc(c) is not None} for v in pair}
      gain = paired(having, *pair, value=acc, unit=POINTS,
                    label=f"fib-coprime - fib-linear, {bucket_text(d)} at {m}x T")
      if gain is not None:
        out.append({**gain, "length": m, "distance": d, "reach": (reach[pair[0]][d], reach[pair[1]][d])})
  return out


def bucket_accuracy(cell: dict, m: int, distance: tuple[int, int]) -> float | None:
  """``cell``'s recall accuracy in the distance bucket ``distance`` at ``m`` x T (``None``: no answer fell in it)."""
  return next((b["accuracy"] for b in cell[RECALL.key][f"{m}x"]["by_distance"] if tuple(b["distance"]) == distance),
              None)


def beats(d: dict) -> str:
  """The words for an accuracy gain's interval: beats, loses to, or no resolved difference."""
  if d["lo"] > 0 or d["hi"] < 0:
    return "coprime beats linear" if d["lo"] > 0 else "coprime loses to linear"
  return "no resolved difference"


def unmeasured(runs: dict, metric: Metric, controls: list[dict], longest: int) -> list[str]:
  """What no paper measured, as markdown lines: recall where each pattern reaches and where it does
  not, coprime against linear by distance (a table) and dense with a sliding window against the best
  sparse variant at ``longest`` x T."""
  lines = []
  follows = [f"{v} " + " / ".join(f"{stats.mean(x):.3f} ({len(x)})" if x else "- (0)"
                                  for x in (split["reached"], split["unreached"]))
             for v, split in reach_splits(runs).items()]
  if follows:
    lines += ["- recall at T where the pattern reaches / where it does not (mean accuracy, (seed, distance) pairs): "
              + "; ".join(follows) + ".", ""]
  gains = coprime_by_distance(runs)
  if gains:
    lines += table(["length", "distance", "fib-coprime - fib-linear accuracy [95% CI]", "verdict",
                    "reach through all layers (coprime / linear)"],
                   [[f"{g['length']}x T", bucket_text(g["distance"]), fmt_pct(g, " points"), beats(g),
                     f"{g['reach'][0]:.2f} / {g['reach'][1]:.2f}"] for g in gains]) + [""]
  for d in controls:
    if d["label"].startswith(f"dense{SINK_LABEL}") and d["label"].endswith(f" at {longest}x T"):
      lines.append(f"- {d['label']} ({metric.name}): {d['unit'].describe(d)}; negative: dense with the window is "
                   "better.")
  return lines


# ----------------------------------------------------------------------------- the sections and the summary


@dataclasses.dataclass
class Findings:
  """A root's sections beyond the claims: ``lines`` (before the claims), the comparisons the power
  section states, and the facts ``--summary`` adds (``validity``, ``unmeasured``)."""
  lines: list[str]
  comparisons: list[tuple[str, list[dict]]]
  metric: str
  validity: str
  unmeasured: list[str]
  at_t: list[list[str]]


def sections(runs: dict, model: dict, multiples: Sequence[int], metric: Metric, plots: pathlib.Path) -> Findings:
  """Builds the sections of one root (plot included, under ``plots``)."""
  plot_recall(runs, model, plots)
  controls = control_comparisons(runs, metric, multiples)
  ood = ood_comparisons(runs, multiples)
  checks = validity(runs, model)
  lines = (recall_section(runs) + ood_section(runs, ood, multiples) + extrapolation_section(runs, multiples)
           + controls_section(controls, metric, multiples) + validity_section(checks))
  return Findings(lines, [("control", controls), ("other-genre text", ood)], metric.name, validity_verdict(checks),
                  unmeasured(runs, metric, controls, max(multiples)), at_t_rows(runs))


def at_t_rows(runs: dict) -> list[list[str]]:
  """One row per variant: seeds, steps, the share of task rows, held-out text perplexity at T (runs
  that saw text) and recall accuracy at T (runs trained with a task), each as mean +- sd over seeds."""
  rows = []
  for variant, by_seed in runs.items():
    cells = list(by_seed.values())
    cfg = cells[0]["config"]
    task = cfg.get("task")
    share = cfg.get("task_mix", 1.0) if task else 0.0
    text = seeds_text([ppl(c) for c in cells]) if share < 1 else "-"
    recall = seeds_text([1 - recall_error(c) for c in cells if RECALL.key in c])  # "-" where no run has a probe
    rows.append([variant, str(len(cells)), str(cfg["steps"]), f"{share:g}", text, recall])
  return rows


def claim_comparisons(verdicts: list[dict]) -> list[tuple[str, list[dict]]]:
  """``(where, comparisons)`` of each claim, for ``power_section``."""
  return [(f"claim {c['claim'].split('.')[0]}", c.get("comparisons", [])) for c in verdicts]


def summary_rows(roots: list[str], facts: dict[str, Findings]) -> list[list[str]]:
  """The summary table's rows of each root's metric and validity checks, one cell per root."""
  return [["claims judged on"] + [facts[r].metric for r in roots] + [""],
          ["validity checks (the study discriminates)"] + [facts[r].validity for r in roots] + [""]]


def at_t_block(roots: list[str], facts: dict[str, Findings]) -> list[str]:
  """The summary's table of every root's variants at T: perplexity and recall side by side, which is how
  a sweep over recipes (the share of task rows, the steps) reads."""
  rows = [[r] + row for r in roots for row in facts[r].at_t]
  return ["", "## Each root at T", "", "Mean +- sd over seeds; perplexity on held-out text of the training corpus "
          "(runs that saw text), recall on the run's own task (runs trained with one).", ""] + table(
      ["root", "variant", "seeds", "steps", "task share of rows", "perplexity at T", "recall at T"], rows)


def summary_block(roots: list[str], facts: dict[str, Findings]) -> list[str]:
  """The summary's "What no paper measured" block: per root that measured any of it."""
  lines = []
  for r in roots:
    if facts[r].unmeasured:
      lines += [f"### {r}", ""] + facts[r].unmeasured + [""]
  if not lines:
    return []
  return ["", "## What no paper measured", "",
          "Recall where each pattern's offsets reach through all layers against where they do not; recall accuracy "
          "by key-to-query distance of a coprime against a linear stagger (does a coprime order "
          "recall at distances a linear order leaves as holes?), beside each pattern's reach through all layers; "
          "and dense with a sliding window of T keys plus sink tokens against the best sparse model at the longest "
          "length. By reach the coprime question has one answer: through all layers a pattern reaches the sums of one "
          "hop per layer, and a sum does not depend on the order of its terms, so a coprime and a linear order of the "
          "same alphas reach exactly the same distances (`train.probe.reach.reachable`); a recall difference between "
          "them is what the models learn, not where their offsets reach.", ""] + lines
