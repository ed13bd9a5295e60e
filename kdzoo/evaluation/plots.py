"""The comparison figure of ``kdzoo compare`` (matplotlib, Agg, no display).

Left (above, for more than eight runs): TAR against FAR (log x) on one
verification protocol (default ``cross_age``), one curve per run (mean over
seeds, shaded ± std). Right (below): bars of TAR@FAR=1e-3 on that
protocol with their 95 % intervals (test identities bootstrapped, and seeds
when a run has several; std over seeds for records without bootstrap
replicates); teacher bars are hatched grey, and the line of a teacher is
dashed.
"""
import io
from typing import List, Optional, Sequence

from kdzoo.utils import atomic_write_bytes
from .verification import far_key

__all__ = ['plot_comparison', 'write_comparison_plot', 'pick_protocol',
           'seeds_title']

_TEACHER_COLOR = '0.55'
_TEACHER_LINES = [('black', '--'), ('0.45', '--'), ('black', ':')]
_SIDE_BY_SIDE_MAX = 8  # more runs: stack the panels, legends outside


def pick_protocol(entries: Sequence[dict],
                  preferred: str = 'cross_age') -> Optional[str]:
    """``preferred`` when some run has its curve or metrics, else the first
    verification protocol found, else None."""
    protos: List[str] = []
    for e in entries:
        protos += [p for p in e.get('curves') or {} if p not in protos]
        protos += [k.split('/')[0] for k in e.get('metrics', {})
                   if '/TAR@FAR=' in k and k.split('/')[0] not in protos]
    if preferred in protos:
        return preferred
    return protos[0] if protos else None


def _bar_far(entries: Sequence[dict], proto: str, far: float) -> float:
    """``far`` if some run measured it, else the lowest FAR that every run
    with TARs on ``proto`` measured (small test sets cannot support 1e-3)."""
    prefix = f'{proto}/TAR@FAR='
    if any(f'{prefix}{far_key(far)}' in e.get('metrics', {})
           for e in entries):
        return far
    common = None
    for e in entries:
        fars = {float(k[len(prefix):]) for k in e.get('metrics', {})
                if k.startswith(prefix)}
        if fars:
            common = fars if common is None else common & fars
    return min(common) if common else far


def plot_comparison(entries: Sequence[dict], title: str = 'comparison',
                    protocol: Optional[str] = None, far: float = 1e-3):
    """A two-panel matplotlib ``Figure`` of aggregated suite entries
    (:func:`kdzoo.commands.report.aggregate`)."""
    from matplotlib.figure import Figure
    proto = protocol or pick_protocol(entries)
    many = len(entries) > _SIDE_BY_SIDE_MAX
    if many:  # curves above bars, legends outside the axes
        fig = Figure(figsize=(max(13, 0.45 * len(entries) + 4), 11),
                     layout='constrained')
        ax_roc, ax_bar = fig.subplots(2, 1)
    else:
        fig = Figure(figsize=(13, 5.2), layout='constrained')
        ax_roc, ax_bar = fig.subplots(1, 2, width_ratios=(1.1, 1))
    students = sum(e.get('role') != 'teacher' for e in entries)
    palette = iter(_palette(students))
    styles = [None if e.get('role') == 'teacher' else next(palette)
              for e in entries]
    colors = [None if st is None else st[0] for st in styles]

    drawn = 0
    teacher_styles = iter(_TEACHER_LINES * len(entries))
    for e, style in zip(entries, styles):
        curve = (e.get('curves') or {}).get(proto)
        is_teacher = style is None
        color, linestyle = style or next(teacher_styles)
        if not curve or not curve.get('far'):
            continue
        far_, tar = curve['far'], curve['tar']
        label = e['name'] + (f' (n={e["n"]})' if e.get('n', 1) > 1 else '')
        ax_roc.plot(far_, tar, marker='.', color=color, label=label,
                    linestyle=linestyle, linewidth=2 if is_teacher else 1.5)
        std = curve.get('tar_std')
        if std and e.get('n', 1) > 1:
            lo = [max(0.0, t - s) for t, s in zip(tar, std)]
            hi = [min(1.0, t + s) for t, s in zip(tar, std)]
            ax_roc.fill_between(far_, lo, hi, color=color, alpha=0.15,
                                linewidth=0)
        drawn += 1
    ax_roc.set_xscale('log')
    ax_roc.set_xlabel('FAR')
    ax_roc.set_ylabel('TAR')
    ax_roc.set_ylim(0, 1.02)
    ax_roc.grid(True, which='both', alpha=0.3)
    ax_roc.set_title(f'{proto}: TAR vs FAR' if proto else 'TAR vs FAR')
    if drawn and many:
        ax_roc.legend(fontsize='small', loc='center left',
                      bbox_to_anchor=(1.01, 0.5), ncol=-(-drawn // 16))
    elif drawn:
        ax_roc.legend(fontsize='small', loc='lower right')
    else:
        ax_roc.text(0.5, 0.5, 'no curve data', ha='center',
                    transform=ax_roc.transAxes)

    bar_far = _bar_far(entries, proto, far) if proto else far
    key = f'{proto}/TAR@FAR={far_key(bar_far)}'
    names, heights, errs, bar_colors, hatches = [], [], [], [], []
    intervals = any(key in (e.get('ci95') or {}) for e in entries)
    for e, color in zip(entries, colors):
        names.append(e['name'])
        value = e.get('metrics', {}).get(key)
        heights.append(0.0 if value is None else value)
        ci = (e.get('ci95') or {}).get(key)
        n = len(e.get('metrics_values', {}).get(key, ()))
        if intervals:  # 95 % interval (identities, and seeds when several)
            errs.append((max(0.0, heights[-1] - ci[0]),
                         max(0.0, ci[1] - heights[-1])) if ci and
                        value is not None else (0.0, 0.0))
        else:
            sd = e.get('metrics_std', {}).get(key, 0.0) if n > 1 else 0.0
            errs.append((sd, sd))
        bar_colors.append(color or _TEACHER_COLOR)
        hatches.append('//' if e.get('role') == 'teacher' else '')
    xs = range(len(names))
    yerr = [[lo for lo, _ in errs], [hi for _, hi in errs]]
    bars = ax_bar.bar(xs, heights, color=bar_colors, edgecolor='black',
                      linewidth=0.6,
                      yerr=yerr if any(map(any, errs)) else None, capsize=3)
    for bar, hatch in zip(bars, hatches):
        bar.set_hatch(hatch)
    for x, e, h, err in zip(xs, entries, heights, errs):
        if key not in e.get('metrics', {}):
            ax_bar.text(x, 0.01, 'n/a', ha='center', fontsize='small')
        else:
            ax_bar.text(x, h + err[1] + 0.01, f'{h:.3f}', ha='center',
                        va='bottom', fontsize='x-small',
                        rotation=90 if many else 0)
    # labels side by side while they fit under their bars (about 14
    # characters a bar at this figure width), slanted otherwise
    slant = len(names) > 4 or max(map(len, names), default=0) > 14
    ax_bar.set_xticks(list(xs), names, rotation=45 if slant else 0,
                      ha='right' if slant else 'center')
    ax_bar.set_ylabel(f'TAR@FAR={far_key(bar_far)}')
    top = max([h + s[1] for h, s in zip(heights, errs)] + [0.1])
    ax_bar.set_ylim(0, min(1.05, max(0.1, top * (1.3 if many else 1.15)
                                     + 0.02)))
    ax_bar.set_title(f'{proto or "?"}: TAR@FAR={far_key(bar_far)}' + (
        ' (95 % interval)' if intervals else ' (std over seeds)'
        if any(map(any, errs)) else '') + (
        f'\n({far_key(far)} not measurable on this test set)'
        if bar_far != far else ''))
    ax_bar.grid(True, axis='y', alpha=0.3)
    if 'teacher' in {e.get('role') for e in entries}:
        from matplotlib.patches import Patch
        ax_bar.legend(handles=[
            Patch(facecolor=_TEACHER_COLOR, hatch='//', edgecolor='black',
                  label='teacher'),
            Patch(facecolor='white', edgecolor='black',
                  label='student runs')],
            fontsize='small',
            **(dict(loc='upper left', bbox_to_anchor=(1.01, 1.0)) if many
               else dict(loc='upper right')))
    fig.suptitle(title)
    return fig


def _palette(count: int):
    """``(color, linestyle)`` per student run: matplotlib's ten default
    colours, tab20 beyond ten runs, and line styles once colours repeat."""
    if count <= 10:
        colors = [f'C{i}' for i in range(10)]
    else:
        from matplotlib import colormaps
        colors = [colormaps['tab20'](i) for i in range(20)]
    styles = ('-', '-.', ':')
    i = 0
    while True:
        yield colors[i % len(colors)], styles[(i // len(colors)) % 3]
        i += 1


def write_comparison_plot(entries: Sequence[dict], path: str,
                          title: str = 'comparison',
                          protocol: Optional[str] = None,
                          far: float = 1e-3, dpi: int = 110):
    """Render :func:`plot_comparison` to a PNG at ``path`` atomically (a
    temporary file in the same directory, then ``os.replace``); returns the
    figure."""
    fig = plot_comparison(entries, title, protocol, far)
    buf = io.BytesIO()
    fig.savefig(buf, format='png', dpi=dpi)
    atomic_write_bytes(path, buf.getvalue())
    return fig


def seeds_title(suite_name: str, seeds: Sequence,
                repeated: Optional[bool] = None,
                trained_once: bool = True) -> str:
    """``'<suite>: N seeds (0, 1, 2; teachers: one seed)'`` when the runs
    were repeated over ``seeds`` (the teachers' part only when
    ``trained_once``: some run, a teacher or ``seeds=False``, was trained
    once), else ``'<suite>: one seed (0)'``."""
    repeated = len(seeds) > 1 if repeated is None else repeated
    if not repeated:
        return f'{suite_name}: one seed ({", ".join(map(str, seeds))})'
    return (f'{suite_name}: {len(seeds)} seeds ({", ".join(map(str, seeds))}'
            + ('; teachers: one seed)' if trained_once else ')'))
