"""Figures, one set per dataset, drawn with seaborn on matplotlib's Agg canvas.

Figures are built on `matplotlib.figure.Figure` with an explicit Agg canvas rather than
through pyplot, so a report never changes the caller's backend or leaks global figures.
Each model keeps one colour across every figure of a report. A figure without data to
show is skipped and named in the report's notes, never written empty.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator

from lambdapipe.atomic import write_with
from lambdapipe.report.load import Collection
from lambdapipe.status import DIVERGED, OK

DPI = 150
PANEL = (3.6, 2.8)  # inches per facet
FORMATS = ("png", "svg")
# Reproducible files: fixed SVG ids, no creation date.
RC = {"svg.hashsalt": "lambdapipe", "svg.fonttype": "none"}
METADATA = {"png": {"Software": None}, "svg": {"Date": None}}


def palette(series: list[str]) -> dict[str, tuple]:
    names = sorted(set(series))
    colours = sns.color_palette("tab10" if len(names) <= 10 else
                                "tab20" if len(names) <= 20 else "husl", len(names))
    return dict(zip(names, colours, strict=True))


def _figure(nrows: int, ncols: int, title: str, sharey: str | bool = False):
    # A lone panel gets room enough for its legend-free axes to read as a plot, not a strip;
    # a lone column room enough for the title, which would otherwise overhang to the left.
    width, height = (6.5, 4.2) if nrows * ncols == 1 else (5.0, PANEL[1]) if ncols == 1 \
        else PANEL
    fig = Figure(figsize=(width * ncols, height * nrows + 0.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=sharey)
    fig.suptitle(_fit_title(title, width * ncols), fontsize=12, fontweight="bold")
    return fig, axes


def _fit_title(title: str, width_in: float) -> str:
    """Break a title wider than its figure (12 pt bold: about 8.5 characters an inch), at
    its parenthesis if it has one: an overhanging title is centred on the figure, not on the
    panels, and leaves an empty margin beside them."""
    chars = int(8.5 * width_in)
    if len(title) <= chars:
        return title
    head, sep, tail = title.partition(" (")
    if sep and len(head) <= chars:
        return f"{head}\n({tail}"
    return textwrap.fill(title, chars)


def _legend(fig: Figure, handles: list) -> None:
    # Anchored just right of the figure; bbox_inches="tight" on save takes it in, and the
    # layout engine leaves it alone, so it never overlaps a panel or the title.
    lines = fig.get_suptitle().count("\n") + 1  # just below the title, however tall either
    top = 1 - (0.55 + 0.22 * (lines - 1)) / fig.get_figheight()
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, top), frameon=False,
               fontsize=9)


def _empty(ax, text: str = "no runs") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_xticks([])
    ax.set_xlabel("")


def _plain_log_ticks(ax, which: str = "y", unit: str = "") -> None:
    """Log axis labelled 0.3, 1, 2 (plus `unit`) rather than 3x10^-1.

    An axis spanning less than a decade may hold no major tick at all, so minor ticks carry
    the labels, more of them the narrower the span, few enough never to overlap.
    """
    axis = ax.xaxis if which == "x" else ax.yaxis
    axis.set_minor_locator(LogLocator(base=10, subs=np.arange(2, 10)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}{unit}"))

    def minor(v, _):
        low, high = sorted(ax.get_xlim() if which == "x" else ax.get_ylim())
        span = math.log10(high / low) if low > 0 else math.inf
        digits = (range(2, 10) if span < 0.35 else (2, 3, 4, 5, 7) if span < 0.8
                  else (2, 3, 5) if span < 1.6 else (2, 5) if span < 3 else ())
        return f"{v:g}{unit}" if _leading_digit(v) in digits else ""

    axis.set_minor_formatter(FuncFormatter(minor))


def _leading_digit(v: float) -> int:
    return round(v / 10 ** math.floor(math.log10(v))) if v > 0 else 0


def _series_handles(colours: dict[str, tuple], names) -> list:
    return [Line2D([], [], color=colours[n], lw=2.5, label=n) for n in sorted(set(names))]


def save(fig: Figure, base: Path, vector_dir: Path | None = None) -> list[Path]:
    """base.png and base.svg; the SVG in `vector_dir` if given (the report keeps its vector
    copies apart, so `dvc plots show` of the figures directory shows each figure once)."""
    written = []
    with matplotlib.rc_context(RC):
        for fmt in FORMATS:
            where = vector_dir if fmt == "svg" and vector_dir is not None else base.parent
            path = where / f"{base.name}.{fmt}"
            write_with(path, lambda fh, fmt=fmt: fig.savefig(
                fh, format=fmt, dpi=DPI, bbox_inches="tight", metadata=METADATA[fmt]))
            written.append(path)
    return written


def _long_metrics(collection: Collection, runs: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """metrics.csv rows of the given runs, tagged with series and noise condition."""
    by_id = {run.run_id: run for run in collection.runs}
    frames = []
    for row in runs.itertuples():
        m = by_id[row.run_id].metrics
        if m is None or not set(columns) <= set(m.columns):
            continue
        frame = m[["iteration", *columns]].copy()
        frame["run_id"], frame["series"], frame["condition"] = (
            row.run_id, row.series, row.condition)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _conditions(df: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(df.sort_values("_cond_order")["condition"]))


def _mark_divergence(ax, runs: pd.DataFrame) -> None:
    for at in runs.loc[runs["status"] == DIVERGED, "diverged_at"]:
        if at is not None and np.isfinite(at):
            ax.axvline(at, color="firebrick", ls=":", lw=1.2)


# --------------------------------------------------------------------------- figures
def loss_curves(dataset: str, runs: pd.DataFrame, collection: Collection,
                colours: dict) -> Figure | None:
    """Training and validation loss against iteration, one facet per noise rate and model."""
    long = _long_metrics(collection, runs, ["train_loss", "val_loss"])
    if long.empty:
        return None
    long = long.melt(id_vars=["iteration", "run_id", "series", "condition"],
                     value_vars=["train_loss", "val_loss"], var_name="split", value_name="loss")
    long = long[np.isfinite(long["loss"]) & (long["loss"] > 0)]
    if long.empty:
        return None
    conds = [c for c in _conditions(runs) if c in set(long["condition"])]
    series = sorted(set(long["series"]))
    # One row per model (a grid has many), one column per noise rate: a row reads as what
    # noise does to that model, on one shared loss axis.
    fig, axes = _figure(len(series), len(conds), f"{dataset}: training and validation loss "
                        "(mean ± sd over seeds)", sharey="row")
    styles = {"train_loss": "-", "val_loss": "--"}
    for i, name in enumerate(series):
        for j, cond in enumerate(conds):
            ax = axes[i][j]
            sub = long[(long["condition"] == cond) & (long["series"] == name)]
            for split, ls in styles.items():
                part = sub[sub["split"] == split]
                if not part.empty:
                    sns.lineplot(part, x="iteration", y="loss", ax=ax, color=colours[name],
                                 linestyle=ls, errorbar="sd", legend=False)
            _mark_divergence(ax, runs[(runs["condition"] == cond) & (runs["series"] == name)])
            ax.set_yscale("log")
            _plain_log_ticks(ax)
            ax.set_title(f"{name} · noise: {cond}", fontsize=9)
            ax.set_xlabel("iteration (optimizer steps)")
            ax.set_ylabel("cross-entropy loss (nats, log)" if j == 0 else "")
            if sub.empty:
                _empty(ax)
    # The row titles name the models: the key says only what the line styles mean.
    handles = [Line2D([], [], color="black", ls="-", label="train loss (noisy labels)"),
               Line2D([], [], color="black", ls="--", label="validation loss")]
    if (runs["status"] == "diverged").any():
        handles.append(Line2D([], [], color="firebrick", ls=":", label="diverged at"))
    _legend(fig, handles)
    return fig


def acc_vs_noise(dataset: str, runs: pd.DataFrame, colours: dict) -> Figure | None:
    """Test accuracy against noise rate per model; every run a point, mean ± sd a line."""
    ok = runs[(runs["status"] == OK) & runs["tst_acc"].map(_finite)]
    # A model trained only on clean labels says nothing about noise: left out, not a stray dot.
    rates = runs.groupby("series")["noise_rate"].nunique()
    keep = rates[rates >= 2].index
    ok, runs = ok[ok["series"].isin(keep)], runs[runs["series"].isin(keep)]
    if ok.empty:
        return None
    kinds = sorted(set(ok["noise_kind"]) - {"clean"})
    fig, axes = _figure(1, len(kinds), f"{dataset}: test accuracy against label noise",
                        sharey=True)
    rng = np.random.default_rng(0)  # fixed jitter: the same runs give the same figure
    for ax, kind in zip(axes[0], kinds, strict=True):
        sub = ok[ok["noise_kind"].isin(["clean", kind])].copy()
        sub["rate_pct"] = 100 * sub["noise_rate"].astype(float)
        sub["acc_pct"] = 100 * sub["tst_acc"].astype(float)
        rates = np.unique(sub["rate_pct"])
        step = np.diff(rates).min(initial=10.0)
        band = 0.3 * step  # each rate's models share a band this wide, centred on the rate
        names = sorted(set(sub["series"]))
        for k, (name, g) in enumerate(sub.groupby("series")):
            # Dodged within the band so error bars stay apart; runs jitter in their slot.
            slot = band / len(names)
            x = g["rate_pct"] + (names.index(name) - (len(names) - 1) / 2) * slot
            jitter = rng.uniform(-0.2, 0.2, len(g)) * slot
            ax.scatter(x + jitter, g["acc_pct"], s=30, alpha=0.8, color=colours[name],
                       edgecolor="white", linewidth=0.6, zorder=10 + k)
            sns.lineplot(g.assign(x=x), x="x", y="acc_pct", ax=ax, color=colours[name],
                         errorbar="sd", err_style="bars", marker="o", legend=False,
                         err_kws={"capsize": 2}, zorder=3 + k)
        # Diverged runs have no accuracy to plot; an x on the bottom edge keeps them in view.
        div = runs[(runs["status"] == DIVERGED) & runs["noise_kind"].isin(["clean", kind])]
        for row in div.itertuples():
            ax.plot(100 * row.noise_rate, 0.03, marker="x", ms=8, mew=2, ls="",
                    color=colours[row.series], transform=ax.get_xaxis_transform())
        # Ticks only at the rates trained: the dodge is not a rate of its own.
        ax.set_xticks(rates, [f"{r:g}" for r in rates])
        ax.set_xlim(rates.min() - 0.6 * step, rates.max() + 0.6 * step)
        ax.set_title(f"{kind} noise", fontsize=10)
        ax.set_xlabel("corrupted training labels (%)")
        ax.set_ylabel("test accuracy (%)")
    handles = _series_handles(colours, runs["series"]) + [
        Line2D([], [], color="grey", marker="o", ls="", alpha=0.8, markeredgecolor="white",
               label="one run"),
        Line2D([], [], color="grey", marker="o", label="mean ± sd over runs"),
    ]
    if (runs["status"] == DIVERGED).any():
        handles.append(Line2D([], [], color="grey", marker="x", mew=2, ls="",
                              label="diverged run"))
    _legend(fig, handles)
    return fig


def _published_alike(runs: pd.DataFrame, published: pd.DataFrame, source: str) -> np.ndarray:
    """Which published ResNet rows some run of ours trained alike, by the tables' one rule
    (`reference.differences`, through compare.match): only those are a like-for-like point
    beside ours; the others are drawn apart (the tables say what differs)."""
    from lambdapipe.report.compare import match, setting_of
    from lambdapipe.report.published_tables import resnet_settings

    settings = resnet_settings(published, source)
    stand_in = bool(runs["stand_in"].any()) if "stand_in" in runs.columns else False
    alike = {hit.name for _, row in runs.iterrows()
             if (hit := match(setting_of(row), settings, stand_in)[0]) is not None}
    return published.index.isin(list(alike))


def acc_vs_params(dataset: str, runs: pd.DataFrame, colours: dict,
                  published: pd.DataFrame | None, source: str | None = None) -> Figure | None:
    """Test accuracy against parameter count (log x), per noise rate; published ResNets grey:
    dark where trained like ours (`source`: the dataset they stand for), faint otherwise."""
    ok = runs[(runs["status"] == OK) & runs["tst_acc"].map(_finite)
              & runs["params"].map(_finite)]
    conds = [c for c in _conditions(ok)
             if ok.loc[ok["condition"] == c, "params"].nunique() >= 2]
    if not conds:
        return None
    fig, axes = _figure(1, len(conds), f"{dataset}: test accuracy against model size",
                        sharey=True)
    for ax, cond in zip(axes[0], conds, strict=True):
        sub = ok[ok["condition"] == cond]
        for name, g in sub.groupby("series"):
            acc = 100 * g["tst_acc"].astype(float)
            ax.errorbar(g["params"].astype(float).mean() / 1e6, acc.mean(),
                        yerr=acc.std(ddof=1) if len(g) > 1 else None, fmt="o", ms=7,
                        capsize=3, color=colours[name])
        if cond == "clean" and published is not None and not published.empty:
            alike = _published_alike(sub, published, source or dataset)
            for rows, colour, style in ((published[alike], "dimgrey", "solid"),
                                        (published[~alike], "silver", "dotted")):
                ax.scatter(rows["params_m"], 100 * rows["test_acc"], marker="D",
                           facecolor="none", edgecolor=colour, linestyle=style, s=36,
                           zorder=1)
                for row in rows.itertuples():
                    ax.annotate(f"R{row.depth}x{row.width} {row.precision}",
                                (row.params_m, 100 * row.test_acc), xytext=(4, -3),
                                textcoords="offset points", fontsize=6, color=colour)
        ax.margins(x=0.12)  # no mean on the frame's edge
        low, high = ax.dataLim.x0, ax.dataLim.x1
        if low > 0 and high / low >= 3:  # a log scale only where sizes differ by factors
            ax.set_xscale("log")
            _plain_log_ticks(ax, "x")
            scale = "millions, log scale"
        else:
            ax.xaxis.set_major_locator(MaxNLocator(4))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.4g}"))
            scale = "millions"
        ax.tick_params(axis="x", which="both", labelsize=8)
        ax.set_title(f"noise: {cond}", fontsize=10)
        ax.set_xlabel(f"parameters ({scale})")
        ax.set_ylabel("test accuracy (%)")
    handles = _series_handles(colours, ok["series"]) + [
        Line2D([], [], color="grey", marker="o", ls="", label="ours: mean ± sd over seeds")]
    if published is not None and not published.empty:
        handles += [Line2D([], [], marker="D", ls="", markerfacecolor="none",
                           markeredgecolor=colour, label=label) for colour, label in (
            ("dimgrey", "published ResNet, trained like ours"),
            ("silver", "published ResNet, not like ours (tables say why)"))]
    _legend(fig, handles)
    return fig


def memorisation(dataset: str, runs: pd.DataFrame, collection: Collection,
                 colours: dict) -> Figure | None:
    """Training accuracy on the noisy labels vs on the true ones: the gap is memorisation."""
    noisy = runs[runs["noise_rate"] > 0]
    long = _long_metrics(collection, noisy, ["train_acc", "train_clean_acc"])
    if long.empty:
        return None
    long = long.melt(id_vars=["iteration", "run_id", "series", "condition"],
                     value_vars=["train_acc", "train_clean_acc"], var_name="labels",
                     value_name="acc")
    long = long[np.isfinite(long["acc"])]
    if long.empty:
        return None
    long["acc"] *= 100
    conds = [c for c in _conditions(noisy) if c in set(long["condition"])]
    series = sorted(set(long["series"]))
    fig, axes = _figure(len(series), len(conds), f"{dataset}: memorisation of noisy labels "
                        "(mean ± sd over seeds)", sharey=True)
    styles = {"train_acc": "-", "train_clean_acc": "--"}
    for i, name in enumerate(series):
        for j, cond in enumerate(conds):
            rate = float(noisy.loc[noisy["condition"] == cond, "noise_rate"].iloc[0])
            ax = axes[i][j]
            sub = long[(long["condition"] == cond) & (long["series"] == name)]
            for labels, ls in styles.items():
                part = sub[sub["labels"] == labels]
                if not part.empty:
                    sns.lineplot(part, x="iteration", y="acc", ax=ax, color=colours[name],
                                 linestyle=ls, errorbar="sd", legend=False)
            ax.axhline(100 * (1 - rate), color="dimgrey", ls=":", lw=1)
            ax.set_title(f"{name} · noise: {cond}", fontsize=9)
            ax.set_xlabel("iteration (optimizer steps)")
            ax.set_ylabel("training accuracy (%)" if j == 0 else "")
            if sub.empty:
                _empty(ax)
    handles = [  # the row titles name the models
        Line2D([], [], color="black", ls="-", label="against noisy labels (trained on)"),
        Line2D([], [], color="black", ls="--", label="against true labels"),
        Line2D([], [], color="dimgrey", ls=":", label="share of labels that are true"),
    ]
    _legend(fig, handles)
    return fig


def _finite(v) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False



# --------------------------------------------------------------------------- attention
def attention_grid(runs: list[tuple[str, dict]], classes: list[str], title: str) -> Figure:
    """One row per image: the input, then FullGrad and Grad-CAM of each run on that image.

    `runs` are (label, arrays of an explain_<split>.npz) on the same image indices, so a
    ResNet and a Lambda-ResNet sit side by side; each map is drawn over the input it explains.
    """
    first = runs[0][1]
    n = len(first["indices"])
    ncols = 1 + 2 * len(runs)
    fig = Figure(figsize=(2.2 * ncols, 2.2 * n + 1.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n, ncols, squeeze=False)
    fig.suptitle(title, fontsize=14, fontweight="bold")
    for i in range(n):
        ax = axes[i, 0]
        ax.imshow(first["images"][i])
        ax.set_title(f"#{int(first['indices'][i])} true {classes[int(first['labels'][i])]}",
                     fontsize=10)
        for j, (label, arrays) in enumerate(runs):
            pred = classes[int(arrays["predicted"][i])]
            for m, key in enumerate(("fullgrad", "gradcam")):
                ax = axes[i, 1 + 2 * j + m]
                ax.imshow(arrays["images"][i])
                ax.imshow(arrays[key][i], cmap="inferno", alpha=0.6, vmin=0, vmax=1)
                name = "FullGrad" if key == "fullgrad" else "Grad-CAM"
                # One line per part of the label ("model, noise: ..."), long parts wrapped:
                # headers must not overlap their neighbours.
                head = "\n".join(textwrap.fill(part, 24) for part in label.split(", "))
                ax.set_title(f"{head}\n{name} · pred {pred}" if i == 0 else f"pred {pred}",
                             fontsize=10, fontweight="bold" if i == 0 else "normal")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(ScalarMappable(Normalize(0, 1), cmap="inferno"), ax=axes[:, 1:],
                 shrink=min(1.0, 4 / n), aspect=30, pad=0.01,
                 label="saliency (normalised to [0, 1] per map)")
    return fig


def position_panels(position: np.ndarray, kind: str, title: str,
                    feature_map: tuple[int, int] | None = None,
                    layer: str | None = None) -> Figure:
    """A lambda layer's learned position embeddings E, one panel per (u, k).

    `position` is k x u x a x b: the r x r kernel of a lambda convolution (`lc`) or the
    (2H-1) x (2W-1) relative-position table (`rpe`) of each query-depth index k. On an
    H x W `feature_map` only the centre (2H-1) x (2W-1) offsets ever touch a pixel; the rest
    keeps its initial noise, so only that centre is drawn. `title` names the run (model,
    seed), `layer` the module the embeddings belong to.
    """
    full = position.shape[2:]
    note = ""
    if feature_map is not None:
        a, b = (min(n, 2 * m - 1) for n, m in zip(full, feature_map, strict=True))
        top, left = (full[0] - a) // 2, (full[1] - b) // 2
        position = position[:, :, top:top + a, left:left + b]
        if (a, b) != tuple(full):
            note = (f" · centre {a}x{b} of {full[0]}x{full[1]}, all a "
                    f"{feature_map[0]}x{feature_map[1]} map reaches")
    k, u = position.shape[:2]
    rows, cols = position.shape[2:]
    # One row per u, or for u = 1 (the usual 16 x 1) a near-square grid: a strip of one row
    # is unreadably wide. One colour scale for all, symmetric around 0, so panels compare.
    n = k * u
    ncols = k if u > 1 else min(n, max(4, math.ceil(math.sqrt(n))))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(1.45 * ncols + 1.2, 1.45 * nrows + 1.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True)
    what = "lambda-convolution kernel" if kind == "lc" else "relative-position table"
    # Two lines: whose embeddings (run, layer), then what a panel is.
    fig.suptitle(f"{title}: learned position embeddings" + (f" of {layer}" if layer else "")
                 + f"\none {what} per query-depth index k{note}", fontsize=10)
    finite = np.abs(position[np.isfinite(position)])
    lim = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    norm = Normalize(-lim, lim)
    # Axes in offsets from the query pixel (0 at the centre), labelled on the outer panels.
    extent = (-(cols // 2) - 0.5, cols - cols // 2 - 0.5, rows - rows // 2 - 0.5,
              -(rows // 2) - 0.5)
    ticks = lambda m: [-(m // 2), 0, m - 1 - m // 2] if m > 2 else list(range(m))  # noqa: E731
    for index, ax in enumerate(axes.flat):
        if index >= n:
            ax.set_axis_off()
            continue
        j, i = divmod(index, k)  # u-major, so each u's k panels read in order
        ax.imshow(position[i, j], cmap="RdBu_r", norm=norm, extent=extent)
        ax.set_xticks(ticks(cols))
        ax.set_yticks(ticks(rows))
        ax.tick_params(labelsize=7, length=2)
        ax.set_title(f"k={i}" + (f" u={j}" if u > 1 else ""), fontsize=8)
    fig.supxlabel("column offset from the query pixel", fontsize=9)
    fig.supylabel("row offset from the query pixel", fontsize=9)
    fig.colorbar(ScalarMappable(norm, cmap="RdBu_r"), ax=axes, shrink=min(1.0, 3 / nrows),
                 aspect=25, pad=0.02, label="embedding value")
    return fig
