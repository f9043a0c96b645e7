"""bench/benchmark.py --merge: parts run later complete an earlier merge; overlapping or mismatched parts are
refused."""
import copy
import json
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / 'bench'))
import benchmark  # noqa: E402


def _report(folder, sets, part=None):
    folder.mkdir()
    report = {'model': 'net.pth', 'machine': 'x86_64, 1 threads', 'sets': sets}
    if part is not None:
        report['part'] = part
    (folder / 'benchmark.json').write_text(json.dumps(report))
    return str(folder)


@pytest.fixture
def urban():
    """The committed benchmark's Urban100 entry (real rows), labelled as an earlier merge of parts 0/4 and 2/4 of 50
    images."""
    with open(REPO / 'bench' / 'results' / 'benchmark.json') as f:
        entry = json.load(f)['sets']['Urban100']
    entry.pop('lowest_budget_within_0.05dB', None)
    return {**entry, 'parts': [[0, 4], [2, 4]], 'images': 50}


def _shifted(entry, images, shift):
    """A part of ``images`` images whose every PSNR is ``shift`` dB above ``entry``'s."""
    part = copy.deepcopy(entry)
    for key in ('parts', 'lowest_budget_within_0.05dB'):
        part.pop(key, None)
    part['images'] = images
    for row in part['summary'].values():
        row['psnr'] += shift
    return part


def test_later_parts_complete_an_earlier_merge(tmp_path, urban):
    merged = _report(tmp_path / 'merged', {'Urban100': urban})
    one = _report(tmp_path / 'one', {'Urban100': _shifted(urban, 25, 0.4)}, part=[1, 4])
    three = _report(tmp_path / 'three', {'Urban100': _shifted(urban, 25, 0.0)}, part=[3, 4])
    assert benchmark.merge_parts([merged, one, three], str(tmp_path / 'out')) == 0
    out = json.loads((tmp_path / 'out' / 'benchmark.json').read_text())['sets']['Urban100']
    assert out['images'] == 100
    assert sorted(map(tuple, out['parts'])) == [(0, 4), (1, 4), (2, 4), (3, 4)]
    # means weighted by images: 50 at +0, 25 at +0.4, 25 at +0 -> +0.1
    assert out['summary']['full']['psnr'] == pytest.approx(urban['summary']['full']['psnr'] + 0.1)
    assert out['summary']['full']['images'] == 100
    md = (tmp_path / 'out' / 'benchmark.md').read_text()
    assert '## Urban100 x4, 100 images\n' in md  # no longer called a subset
    assert (tmp_path / 'out' / 'curve_Urban100.png').stat().st_size > 0


def test_merge_refuses_overlapping_or_mismatched_parts(tmp_path, urban):
    merged = _report(tmp_path / 'merged', {'Urban100': urban})
    again = _report(tmp_path / 'again', {'Urban100': _shifted(urban, 25, 0.0)}, part=[2, 4])
    with pytest.raises(SystemExit, match=r"the parts of Urban100 overlap in 'full': \[\(0, 4\), \(2, 4\)\] and "
                       r'\[\(2, 4\)\]'):
        benchmark.merge_parts([merged, again], str(tmp_path / 'out'))
    fewer = _shifted(urban, 25, 0.0)
    del fewer['summary']['tiles: oracle 0.2']
    other = _report(tmp_path / 'other', {'Urban100': fewer}, part=[1, 4])
    with pytest.raises(SystemExit, match=r"'tiles: oracle 0.2' of Urban100 covers parts \[\(0, 4\), \(2, 4\)\], not "
                       r'all of \[\(0, 4\), \(1, 4\), \(2, 4\)\]'):
        benchmark.merge_parts([merged, other], str(tmp_path / 'out'))


def test_rows_of_another_run_over_the_same_images_join_the_merge(tmp_path, urban):
    """A run of new rows (``--modes``) over the images of an earlier merge adds them; the full network, run again
    beside them, must agree with the merge's."""
    merged = _report(tmp_path / 'merged', {'Urban100': urban})
    new = {key: row for key, row in _shifted(urban, 50, 0.0)['summary'].items() if key == 'full'}
    new['tiles: learned max_loss 0.05'] = dict(urban['summary']['tiles: Eq. 15'], psnr=24.6)
    later = dict(_shifted(urban, 50, 0.0), summary=new, parts=[[0, 4], [2, 4]])
    rows = _report(tmp_path / 'rows', {'Urban100': later})
    assert benchmark.merge_parts([merged, rows], str(tmp_path / 'out')) == 0
    out = json.loads((tmp_path / 'out' / 'benchmark.json').read_text())['sets']['Urban100']
    assert out['summary']['tiles: learned max_loss 0.05']['psnr'] == 24.6 and out['images'] == 50
    assert out['summary']['full']['psnr'] == pytest.approx(urban['summary']['full']['psnr'])
    assert set(urban['summary']) < set(out['summary'])
    new['full'] = dict(new['full'], psnr=new['full']['psnr'] + 0.01)  # a full network that disagrees is refused
    rows = _report(tmp_path / 'rows2', {'Urban100': dict(later, summary=new)})
    with pytest.raises(SystemExit, match="overlap in 'full'"):
        benchmark.merge_parts([merged, rows], str(tmp_path / 'out2'))


def test_flops_within_interpolates_along_the_upper_envelope():
    rows = {'tiles: x 0.4': {'ratio_whole': 0.4, 'psnr': 27.0}, 'tiles: x 0.5': {'ratio_whole': 0.5, 'psnr': 27.2},
            'tiles: x 0.6': {'ratio_whole': 0.6, 'psnr': 27.1}, 'tiles: x 0.7': {'ratio_whole': 0.7, 'psnr': 27.4}}
    # target 27.3 (0.05 dB under 27.35): between 0.6, where 27.1 counts as the envelope's 27.2, and 0.7 at 27.4
    assert benchmark.flops_within(rows, 'tiles: x', 27.35) == pytest.approx(0.65)
    assert benchmark.flops_within(rows, 'tiles: x', 27.2) == pytest.approx(0.475)  # 27.15: 3/4 from 27.0 to 27.2
    assert benchmark.flops_within(rows, 'tiles: x', 27.0) == 0.4  # the first point already
    assert benchmark.flops_within(rows, 'tiles: x', 28.0) is None and benchmark.flops_within(rows, 'nothing', 1) is None

    hull = {'fixed 0': {'ratio_whole': 0.2, 'psnr': 26.0}, 'fixed 1': {'ratio_whole': 0.6, 'psnr': 27.0},
            'fixed 2': {'ratio_whole': 0.7, 'psnr': 27.0}, 'fixed 3': {'ratio_whole': 1.0, 'psnr': 27.4}}
    # w/o the hull the crossing of 27.2 lies between 0.7 and 1.0; with it, between 0.6 and 1.0 (0.7 is under the line)
    assert benchmark.flops_within(hull, 'fixed', 27.25) == pytest.approx(0.85)
    assert benchmark.flops_within(hull, 'fixed', 27.25, hull=True) == pytest.approx(0.8)


def test_a_report_of_some_rows_only_has_its_section_and_curve(tmp_path, urban):
    """``--modes full learned``: no Eq. 15 or budget-rule rows; the section and the plot are made from what there is."""
    summary = {k: r for k, r in urban['summary'].items() if k == 'full' or k.startswith('fixed')}
    entry = {'summary': summary, 'bicubic': urban['bicubic'], 'cache_check_max_abs': 0.0, 'images': 50}
    md = benchmark.set_section('Urban100', entry, str(tmp_path))
    assert entry['lowest_budget_within_0.05dB'] == {'patches': None, 'tiles': None}
    assert '- tiles: lowest budget within 0.05 dB of the whole-image full network' in '\n'.join(md)
    assert (tmp_path / 'curve_Urban100.png').stat().st_size > 1000
