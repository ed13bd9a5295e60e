"""The table ``kdzoo bench`` prints."""


from .session import _ratio_text


# ------------------------------------------------------------ report
def _gflops(n: int) -> str:
    return f'{n / 1e9:.3f}'


def print_report(record: dict) -> None:
    """The results table, the speed targets and the FLOP expectation."""
    from rich.table import Table
    from kdzoo.utils.console import console as rich_console
    console = rich_console()
    cfg = record['config']
    extras = [name for name, on in (('channels_last', cfg['channels_last']),
                                    ('compiled', cfg['compile'])) if on]
    title = (f"kdzoo bench on {record['machine']['device']}: batch "
             f"{cfg['batch_size']}, {cfg['image_size']} px, "
             f"{', '.join([cfg['precision']] + extras)}; {cfg['steps']} "
             f"timed steps after {cfg['warmup']} warm-up")
    table = Table(title=title)
    columns = ('data', 'setting', 'images/s', 'ms/step mean',
               'ms/step median', 'peak MiB', '× student_alone', '× plain',
               'slowdown', 'FLOP-expected slowdown')
    for col in columns:
        table.add_column(col, justify='left' if col in ('data', 'setting')
                         else 'right')

    def fmt(value, digits=2):
        return '—' if value is None else f'{value:.{digits}f}'
    for r in record['results']:
        table.add_row(r['data'], r['setting'], fmt(r['images_per_s'], 1),
                      fmt(r['ms_per_step_mean']),
                      fmt(r['ms_per_step_median']),
                      fmt(r['peak_memory_mib'], 0),
                      fmt(r['vs_student_alone']), fmt(r['vs_plain_pytorch']),
                      fmt(r['slowdown_measured']),
                      fmt(r['slowdown_expected_flops']))
    console.print(table)
    if record['targets']:
        targets = Table(title='speed targets (measured, not asserted)')
        for col in ('data', 'target', 'measured', 'result'):
            targets.add_column(col)
        for t in record['targets']:
            targets.add_row(t['data'], t['target'],
                            _ratio_text(t['measured'], t['threshold']),
                            '[green]pass[/]' if t['passed']
                            else '[red]fail[/]')
        console.print(targets)
    flops = record['flops']
    teachers = ', '.join(_gflops(t['total'])
                         for t in flops['teacher_forward'])
    console.print(f"forward GFLOPs per image: student "
                  f"{_gflops(flops['student_forward']['total'])}, teachers "
                  f"{teachers} (backbones only)")
    for r in record['results']:
        if 'cache_build_s' in r:
            console.print(f"teacher cache ({r['data']} data): built in "
                          f"{r['cache_build_s']:.2f} s before timing")
    pipe = record.get('input_pipeline')
    if pipe:
        console.print(f"input pipeline alone ({pipe['dataset']}, "
                      f"{pipe['num_workers']} workers"
                      f"{', JPEG decode' if pipe['jpeg_decode'] else ''}): "
                      f"{pipe['images_per_s']:.1f} images/s")
    console.print(f"statistic: {record['method']['statistic']}; memory: "
                  f"{record['method']['memory']}")
