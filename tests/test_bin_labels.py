""".bin labels sidecar (identity + photo key per image): builders from LFW
pairs.txt / the CFP protocol / a pairs file, `kdzoo pack labels`, and the
dataset metainfo."""
import collections
import hashlib
import io
import os

import numpy as np
import pytest
from conftest import shared_path
from PIL import Image

from kdzoo.cli import main
from kdzoo.datasets import InsightFaceBinDataset, InsightFaceBinSets
from kdzoo.datasets.bin_dataset import (count_all_pairs, decode_image,
                                        default_labels_path, load_bin_pairs,
                                        read_bin_labels)
from kdzoo.datasets.pack import (cfp_protocol_labels, lfw_pairs_labels,
                                 pairs_file_labels, write_bin,
                                 write_bin_labels)
from kdzoo.utils.errors import ConfigError, DataError


def jpeg(seed, size=(12, 10)):
    img = np.random.default_rng(seed).integers(0, 256, (*size, 3),
                                               dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format='JPEG', quality=90)
    return buf.getvalue()


# A tiny labelled set: photos of identities a, b, c; photo (name, n) is
# the JPEG of seed PHOTOS[(name, n)]. Pairs in .bin order.
PHOTOS = {('a', 1): 1, ('a', 2): 2, ('b', 1): 3, ('b', 2): 4, ('c', 1): 5}
PAIRS = [(('a', 1), ('a', 2), 1), (('b', 1), ('b', 2), 1),
         (('a', 1), ('b', 1), 0), (('a', 2), ('c', 1), 0)]


def make_set(tmp_path, name='t.bin', pairs=PAIRS):
    """Image folder + pairs file + packed .bin (with sidecar)."""
    root = tmp_path / 'faces'
    for (who, n), seed in PHOTOS.items():
        os.makedirs(root / who, exist_ok=True)
        (root / who / f'{n}.jpg').write_bytes(jpeg(seed))
    lines = [f'{a[0]}/{a[1]}.jpg {b[0]}/{b[1]}.jpg {s}' for a, b, s in pairs]
    pairs_file = tmp_path / 'pairs.txt'
    pairs_file.write_text('\n'.join(lines) + '\n')
    out = str(tmp_path / name)
    assert main(['pack', 'bin', '--pairs', str(pairs_file), '--root',
                 str(root), out, '--labels']) == 0
    return out, str(pairs_file)


def sidecar_lines(path):
    return open(path, encoding='utf-8').read().split('\n')


def one_line_error(capsys, *parts):
    err = capsys.readouterr().err.strip()
    assert '\n' not in err and 'Traceback' not in err, err
    for part in parts:
        assert part in err, err
    return err


# ------------------------------------------------------------- synthetic
def test_pack_bin_labels_and_metainfo_contract(tmp_path, capsys):
    out, _ = make_set(tmp_path)
    printed = capsys.readouterr().out.strip().splitlines()
    sidecar = out + '.labels.tsv'
    assert printed == [
        f'packed 4 pairs (2 same, 5 images) -> {out}',
        f'labelled 8 images of {out}: 5 distinct of 3 identities (2 '
        f'positive and 8 negative pairs among them) -> {sidecar}']
    lines = sidecar_lines(sidecar)
    sha = hashlib.sha256(open(out, 'rb').read()).hexdigest()
    assert lines[:6] == ['# kdzoo bin labels v1', '# bin: t.bin',
                         f'# bin_sha256: {sha}', '# images: 8',
                         '# source: kdzoo pack bin --pairs pairs.txt',
                         'identity\timage_key']
    assert lines[6:] == ['a\ta/1.jpg', 'a\ta/2.jpg', 'b\tb/1.jpg',
                         'b\tb/2.jpg', 'a\ta/1.jpg', 'b\tb/1.jpg',
                         'a\ta/2.jpg', 'c\tc/1.jpg', '']
    # the .bin itself is unchanged InsightFace format
    blobs, issame = load_bin_pairs(out)
    assert issame.tolist() == [True, True, False, False]

    ds = InsightFaceBinDataset(out)  # sidecar found beside the .bin
    ver = ds.metainfo['verification']['t']
    assert sorted(ver) == ['identity_names', 'image_ids', 'issame', 'labels',
                           'num_folds', 'pairs']
    assert ver['identity_names'] == ['a', 'b', 'c']
    assert ver['labels'].dtype == np.int64 and ver['labels'].shape == (8,)
    assert ver['labels'].tolist() == [0, 0, 1, 1, 0, 1, 0, 2]
    assert ver['image_ids'].dtype == np.int64
    assert ver['image_ids'].tolist() == [0, 1, 2, 3, 0, 2, 1, 4]
    assert ds.get_data_info(0)['label'] == -1  # items stay unlabelled
    assert count_all_pairs(ver['labels'], ver['image_ids']) == dict(
        images=8, distinct_images=5, identities=3, positive_pairs=2,
        negative_pairs=8)
    # off by choice; explicit file; the default one demanded
    plain = InsightFaceBinDataset(out, labels_file=False)
    assert 'labels' not in plain.metainfo['verification']['t']
    os.rename(sidecar, tmp_path / 'elsewhere.tsv')
    assert 'labels' not in InsightFaceBinDataset(out).metainfo[
        'verification']['t']
    ds = InsightFaceBinDataset('t.bin', data_root=str(tmp_path),
                               labels_file='elsewhere.tsv')
    assert ds.metainfo['verification']['t']['labels'].tolist()[-1] == 2
    with pytest.raises(DataError, match=r't\.bin: labels_file=True but '
                       r'there is no t\.bin\.labels\.tsv beside it; build '
                       r'it with `kdzoo pack labels`'):
        InsightFaceBinDataset(out, labels_file=True)
    with pytest.raises(DataError, match='nope.tsv: labels file not found'):
        InsightFaceBinDataset(out, labels_file=str(tmp_path / 'nope.tsv'))


def test_bin_sets_labels_span_the_combined_dataset(tmp_path):
    out, _ = make_set(tmp_path)
    other = str(tmp_path / 'other.bin')
    write_bin([(jpeg(7), jpeg(8)), (jpeg(9), jpeg(9))], [False, True], other)
    ds = InsightFaceBinSets([other, out])
    ver = ds.metainfo['verification']
    assert 'labels' not in ver['other']
    assert ver['t']['pairs'][0].tolist() == [4, 5]
    assert ver['t']['labels'].tolist() == [-1] * 4 + [0, 0, 1, 1, 0, 1, 0, 2]
    assert ver['t']['image_ids'].tolist() == [-1] * 4 + [0, 1, 2, 3, 0, 2, 1,
                                                         4]
    ds = InsightFaceBinSets([other, out], labels_files=[None, False])
    assert 'labels' not in ds.metainfo['verification']['t']
    with pytest.raises(ConfigError, match='labels_files must be a list of 2'):
        InsightFaceBinSets([other, out], labels_files=[None])


def test_wrong_bin_is_refused_naming_both_files(tmp_path):
    out, _ = make_set(tmp_path)
    other = str(tmp_path / 'other.bin')
    write_bin([(jpeg(7), jpeg(8))] * 4, [True, True, False, False], other)
    with pytest.raises(DataError) as exc:
        InsightFaceBinDataset(other, labels_file=out + '.labels.tsv')
    msg = str(exc.value)
    assert f'{out}.labels.tsv was written for another .bin' in msg
    assert f"file 't.bin') than {other}" in msg
    assert 'kdzoo pack labels' in msg and '\n' not in msg


def test_write_bin_removes_a_stale_sidecar(tmp_path):
    out, _ = make_set(tmp_path)
    sidecar = out + '.labels.tsv'
    blobs, issame = load_bin_pairs(out)
    pairs = list(zip(blobs[0::2], blobs[1::2]))
    write_bin(pairs, issame, out)  # same bytes: the sidecar still fits
    assert os.path.exists(sidecar)
    with pytest.warns(UserWarning, match='labelled the previous'):
        write_bin(pairs[:2], issame[:2], out)
    assert not os.path.exists(sidecar)
    InsightFaceBinDataset(out)  # no stale sidecar to trip over


@pytest.mark.parametrize('edit,match', [
    (lambda ls: ls[:-2] + ls[-1:],
     r'7 image lines but the header says "# images: 8"'),
    (lambda ls: [x.replace('# images: 8', '# images: 7') for x in ls[:-2]]
     + ls[-1:], r'labels for 7 images, but .*t\.bin holds 8'),
    (lambda ls: ls[:8] + ['b b/2.jpg'] + ls[9:],
     r"line 9 is 'b b/2.jpg'; expected \"identity<TAB>image_key\""),
    (lambda ls: ls[:8] + ['b\t'] + ls[9:], r"line 9 is 'b\\t'"),
    (lambda ls: ls[:8] + ['a\ta/1.jpg\textra'] + ls[9:], 'line 9 is'),
    (lambda ls: ['# other'] + ls[1:], 'not a kdzoo .bin labels file'),
    (lambda ls: ls[:5] + ls[6:], "line 6 is 'a\\\\ta/1.jpg'; expected the "
     "column line"),
    (lambda ls: [x for x in ls if not x.startswith('# bin_sha256')],
     r'no "# bin_sha256: \.\.\." line'),
    # b/2.jpg labelled 'a': pair 1 (same) then disagrees
    (lambda ls: ls[:9] + ['a\tb/2.jpg'] + ls[10:],
     r'pair 1 \(images 2, 3: .b. vs .a.\) is same in the \.bin but the '
     'identities say different'),
    # the same photo given two identities
    (lambda ls: ls[:10] + ['c\ta/1.jpg'] + ls[11:],
     r"images 0 \('a/1.jpg', identity 'a'\) and 4 \('a/1.jpg', identity "
     r"'c'\) have the same image key but different identities"),
])
def test_sidecar_errors_name_file_line_and_fix(tmp_path, edit, match):
    out, _ = make_set(tmp_path)
    sidecar = out + '.labels.tsv'
    lines = sidecar_lines(sidecar)
    with open(sidecar, 'w', encoding='utf-8') as f:
        f.write('\n'.join(edit(lines)))
    with pytest.raises(DataError, match=match) as exc:
        InsightFaceBinDataset(out)
    msg = str(exc.value)
    assert msg.startswith(sidecar) and '\n' not in msg
    if 'not a kdzoo' not in match:
        assert 'kdzoo pack labels' in msg


def test_pack_labels_from_pairs_file_checks_the_bin(tmp_path, capsys):
    out, pairs_file = make_set(tmp_path)
    os.unlink(out + '.labels.tsv')
    side = str(tmp_path / 'x.tsv')
    assert main(['pack', 'labels', '--pairs', pairs_file, out, '--out',
                 side]) == 0
    assert capsys.readouterr().out.strip().endswith(f'-> {side}')
    assert InsightFaceBinDataset(out, labels_file=side).metainfo[
        'verification']['t']['image_ids'].max() == 4
    # a list in another order: the same key would name different pictures
    swapped = tmp_path / 'swapped.txt'
    lines = open(pairs_file).read().splitlines()
    swapped.write_text('\n'.join([lines[1], lines[0]] + lines[2:]) + '\n')
    assert main(['pack', 'labels', '--pairs', str(swapped), out]) == 2
    one_line_error(capsys, 'swapped.txt: images 2 and 4 of', 'both have '
                   "the key 'a/1.jpg' but are different pictures",
                   'not in .bin order')
    # a list for another .bin
    short = tmp_path / 'short.txt'
    short.write_text('\n'.join(lines[:3]) + '\n')
    assert main(['pack', 'labels', '--pairs', str(short), out]) == 2
    one_line_error(capsys, 'short.txt: lists 3 pairs (6 images) but',
                   'holds 4 pairs (8 images)')
    # identities that contradict the flags
    flipped = tmp_path / 'flipped.txt'
    flipped.write_text(lines[0][:-1] + '0\n')
    with pytest.raises(DataError, match=r"flipped\.txt: line 1 says "
                       r"different \(0\) but the identity folders are 'a' "
                       "and 'a'"):
        pairs_file_labels(str(flipped))
    flat = tmp_path / 'flat.txt'
    flat.write_text('x.jpg a/1.jpg 0\n')
    with pytest.raises(DataError, match=r"line 1: 'x.jpg' has no identity "
                       'folder'):
        pairs_file_labels(str(flat))
    # pack bin --labels refuses such a list before reading any image, and
    # writes neither file
    assert main(['pack', 'bin', '--pairs', str(flipped), '--root',
                 str(tmp_path / 'none'), str(tmp_path / 'n.bin'),
                 '--labels']) == 2
    one_line_error(capsys, 'flipped.txt: line 1 says different')
    assert not os.path.exists(tmp_path / 'n.bin')


def test_pack_labels_argument_errors(tmp_path, capsys):
    out, pairs_file = make_set(tmp_path)
    capsys.readouterr()
    assert main(['pack', 'labels', out]) == 2
    one_line_error(capsys, 'kdzoo pack: error: kdzoo pack labels needs '
                   'exactly one of --lfw-pairs FILE, --cfp-protocol DIR or '
                   '--pairs FILE (got none)')
    assert main(['pack', 'labels', out, '--pairs', pairs_file,
                 '--lfw-pairs', pairs_file]) == 2
    one_line_error(capsys, '(got --lfw-pairs, --pairs)')
    assert main(['pack', 'labels', out, '--pairs', pairs_file,
                 '--cfp-split', 'FP']) == 2
    one_line_error(capsys, '--cfp-split goes with --cfp-protocol')
    assert main(['pack', 'labels', out, '--cfp-protocol', str(tmp_path),
                 '--cfp-split', 'XX']) == 2
    one_line_error(capsys, '--cfp-split must be FF or FP')


def write_lfw_style(tmp_path, header, lines):
    path = tmp_path / 'lfw_pairs.txt'
    path.write_text('\n'.join([header] + lines) + '\n')
    return str(path)


def test_lfw_pairs_parser(tmp_path):
    path = write_lfw_style(tmp_path, '2\t1', [
        'Ann\t1\t2', 'Ann\t1\tBob\t3', 'Bob 3 12', 'Bob 3 Ann 2'])
    identities, keys = lfw_pairs_labels(path)
    assert identities == ['Ann', 'Ann', 'Ann', 'Bob', 'Bob', 'Bob', 'Bob',
                          'Ann']
    assert keys == ['Ann/0001', 'Ann/0002', 'Ann/0001', 'Bob/0003',
                    'Bob/0003', 'Bob/0012', 'Bob/0003', 'Ann/0002']
    assert lfw_pairs_labels(write_lfw_style(
        tmp_path, '1', ['Ann 1 2', 'Ann 1 Bob 3']))[1][-1] == 'Bob/0003'
    for header, lines, match in [
            ('10 300', ['Ann 1 2'], r'1 pair lines but line 1 \(10 300\) '
             'announces 6000'),
            ('1', ['Ann 1 2', 'Ann 1 Bob 2 3'], r"line 3 is 'Ann 1 Bob 2 "
             r"3'; expected \"name n1 n2\""),
            ('1', ['Ann 1 2', 'Ann 1 Bob'], r"line 3: image number 'Bob'"),
            ('1', ['Ann 1 x', 'Ann 1 Bob 2'], r"line 2: image number 'x'"),
            ('a b c', [], 'line 1 should be')]:
        with pytest.raises(DataError, match=match):
            lfw_pairs_labels(write_lfw_style(tmp_path, header, lines))


def make_cfp_protocol(root, folds):
    """CFP-style Protocol/ folder; folds: [(same pairs, diff pairs)] of
    Pair_list_F indices. Image i is identity (i - 1) // 2 + 1, photo
    (i - 1) % 2 + 1."""
    proto = root / 'Protocol'
    os.makedirs(proto)
    with open(proto / 'Pair_list_F.txt', 'w') as f:
        for i in range(1, 9):
            f.write(f'{i} ../Data/Images/{(i - 1) // 2 + 1:03d}/frontal/'
                    f'{(i - 1) % 2 + 1:02d}.jpg\n')
    for k, (same, diff) in enumerate(folds, 1):
        d = proto / 'Split' / 'FF' / f'{k:02d}'
        os.makedirs(d)
        for name, pairs in (('same', same), ('diff', diff)):
            (d / f'{name}.txt').write_text(
                ''.join(f'{a},{b}\n' for a, b in pairs))
    return str(root)


def test_cfp_protocol_parser_and_order(tmp_path):
    folds = [([(1, 2), (3, 4)], [(1, 3), (5, 7)]),
             ([(6, 5), (8, 7)], [(2, 8), (4, 6)])]
    root = make_cfp_protocol(tmp_path / 'cfp', folds)
    identities, keys = cfp_protocol_labels(root)
    assert keys[:4] == ['001/frontal/01', '001/frontal/02',
                        '002/frontal/01', '002/frontal/02']
    assert identities[4:8] == ['001', '002', '003', '004']
    assert cfp_protocol_labels(os.path.join(root, 'Protocol'), 'ff')[1] == \
        keys
    # a .bin in protocol order: fold 1 same, fold 1 diff, fold 2 same, ...
    photo = {k: jpeg(i) for i, k in enumerate(sorted(set(keys)))}
    bin_path = str(tmp_path / 'cfp_ff.bin')
    write_bin([(photo[a], photo[b]) for a, b in zip(keys[0::2], keys[1::2])],
              [1, 1, 0, 0, 1, 1, 0, 0], bin_path)
    done = write_bin_labels(bin_path, identities, keys, source='cfp FF')
    assert (done['distinct_images'], done['identities']) == (8, 4)
    ds = InsightFaceBinDataset(bin_path)
    assert ds.metainfo['verification']['cfp_ff']['labels'].tolist() == [
        0, 0, 1, 1, 0, 1, 2, 3, 2, 2, 3, 3, 0, 3, 1, 2]
    # another reading (all "same" files first) is caught: one key would
    # name two different pictures ...
    order = [0, 1, 4, 5, 2, 3, 6, 7]
    keys2 = [k for p in order for k in keys[2 * p:2 * p + 2]]
    ids2 = [k[:3] for k in keys2]
    with pytest.raises(DataError, match=r"cfp FF: images 0 and 8 of .*"
                       r"cfp_ff\.bin both have the key '001/frontal/01' but "
                       'are different pictures'):
        write_bin_labels(bin_path, ids2, keys2, source='cfp FF')
    # ... and identities that contradict issame (002 taken for 001)
    merged = ['001' if x == '002' else x for x in identities]
    with pytest.raises(DataError, match=r'cfp FF vs .*cfp_ff\.bin: pair 2 '
                       r"\(images 4, 5: '001' vs '001'\) is different in the "
                       r'\.bin but the identities say same .*give the pairs '
                       'list this .bin was packed from'):
        write_bin_labels(bin_path, merged, keys, source='cfp FF')
    bad = tmp_path / 'cfp' / 'Protocol' / 'Split' / 'FF' / '02' / 'diff.txt'
    bad.write_text('2,8\n4;6\n')
    with pytest.raises(DataError, match=r"02/diff\.txt: line 2 is '4;6'; "
                       'expected "i,j"'):
        cfp_protocol_labels(root)
    bad.write_text('2,99\n')
    with pytest.raises(DataError, match=r'diff\.txt: line 1: index 99 is '
                       'not in the pair list'):
        cfp_protocol_labels(root)
    with pytest.raises(DataError, match='CFP pair list not found'):
        cfp_protocol_labels(str(tmp_path))


# --------------------------------------------------------------- real data
def real_labels(tmp_path, capsys, name, args):
    """`kdzoo pack labels` for a shared .bin, the sidecar written to
    tmp_path (never beside the shared file)."""
    bin_path = shared_path('data', 'verification', f'{name}.bin')
    side = str(tmp_path / f'{name}.labels.tsv')
    assert main(['pack', 'labels', *args, bin_path, '--out', side]) == 0
    summary = capsys.readouterr().out.strip()
    print(summary)  # the counts, for the record (-s)
    ds = InsightFaceBinDataset(bin_path, labels_file=side)
    ver = ds.metainfo['verification'][name]
    blobs, issame = load_bin_pairs(bin_path)
    identities, keys, header = read_bin_labels(side, bin_path, len(blobs))
    assert header['bin'] == f'{name}.bin'
    return summary, ver, blobs, issame, identities, keys


def check_real(ver, blobs, issame, identities, keys):
    """Independent of the library's own checks: pairs agree with issame;
    one picture per key; keys of one identity are different pictures,
    except the returned groups of byte-identical keys."""
    names = ver['identity_names']
    labels = ver['labels']
    assert [names[i] for i in labels] == identities
    assert ((labels[0::2] == labels[1::2]) == issame).all()
    assert ((np.asarray(identities[0::2]) == np.asarray(identities[1::2]))
            == issame).all()
    by_key = collections.defaultdict(set)
    for key, blob in zip(keys, blobs):
        by_key[key].add(blob)
    assert all(len(v) == 1 for v in by_key.values())  # byte-identical
    # one decode per key: different keys -> different pixels, but for
    # byte-identical copies (listed)
    by_pixels = collections.defaultdict(list)
    for key, (blob, ) in by_key.items():
        by_pixels[hashlib.sha1(decode_image(blob).tobytes()).digest()] \
            .append(key)
    copies = sorted(sorted(v) for v in by_pixels.values() if len(v) > 1)
    for group in copies:
        assert len({by_key[k].pop() for k in group}) == 1  # same bytes
        assert len({k.split('/')[0] for k in group}) == 1  # one identity
    # image_ids: one per picture (key, merged with its copies)
    first = {k: i for i, k in reversed(list(enumerate(keys)))}
    ids = ver['image_ids']
    assert all(ids[i] == ids[first[k]] for i, k in enumerate(keys))
    assert len(np.unique(ids)) == len(by_pixels)
    for group in copies:
        assert len({int(ids[first[k]]) for k in group}) == 1
    return copies


def test_lfw_labels_from_pairs_txt(tmp_path, capsys):
    pairs = shared_path('data', 'protocols', 'lfw', 'pairs.txt')
    summary, ver, blobs, issame, identities, keys = real_labels(
        tmp_path, capsys, 'lfw', ['--lfw-pairs', pairs])
    assert keys[:2] == ['Abel_Pacheco/0001', 'Abel_Pacheco/0004']
    assert check_real(ver, blobs, issame, identities, keys) == []
    assert len(set(keys)) == 7701 and len(set(identities)) == 4281
    assert count_all_pairs(ver['labels'], ver['image_ids']) == dict(
        images=12000, distinct_images=7701, identities=4281,
        positive_pairs=8101, negative_pairs=29640749)
    assert ': 7701 distinct of 4281 identities (8101 positive and 29640749 ' \
        'negative pairs among them)' in summary


def test_cfp_ff_labels_from_protocol(tmp_path, capsys):
    protocol = shared_path('data', 'protocols', 'cfp')
    summary, ver, blobs, issame, identities, keys = real_labels(
        tmp_path, capsys, 'cfp_ff', ['--cfp-protocol', protocol,
                                     '--cfp-split', 'FF'])
    assert keys[:2] == ['001/frontal/04', '001/frontal/07']
    copies = check_real(ver, blobs, issame, identities, keys)
    # CFP itself stores some photos twice under different names
    assert len(copies) == 26 and sum(map(len, copies)) == 53
    assert ['195/frontal/02', '195/frontal/06', '195/frontal/10'] in copies
    assert len(set(keys)) == 4764 and len(set(identities)) == 500
    assert count_all_pairs(ver['labels'], ver['image_ids']) == dict(
        images=14000, distinct_images=4737, identities=500,
        positive_pairs=20181, negative_pairs=11197035)
    assert ': 4737 distinct of 500 identities (20181 positive' in summary


def test_real_sets_with_labels_as_one_test_set(tmp_path):
    """InsightFaceBinSets: LFW + CFP-FF labels land at their offsets."""
    lfw = shared_path('data', 'verification', 'lfw.bin')
    cfp = shared_path('data', 'verification', 'cfp_ff.bin')
    pairs = shared_path('data', 'protocols', 'lfw', 'pairs.txt')
    side = str(tmp_path / 'lfw.tsv')
    write_bin_labels(lfw, *lfw_pairs_labels(pairs), out=side)
    ds = InsightFaceBinSets([cfp, lfw], labels_files=[False, side])
    ver = ds.metainfo['verification']
    assert len(ds) == 26000 and 'labels' not in ver['cfp_ff']
    labels = ver['lfw']['labels']
    assert (labels[:14000] == -1).all() and (labels[14000:] >= 0).all()
    assert ver['lfw']['pairs'].min() == 14000
    p = ver['lfw']['pairs']
    assert ((labels[p[:, 0]] == labels[p[:, 1]]) == ver['lfw']['issame']
            ).all()
    assert default_labels_path(lfw) == lfw + '.labels.tsv'


def test_labelled_bin_is_scored_over_all_distinct_pairs(tmp_path):
    """With a sidecar, the metric's TAR rests on every pair of the set's
    distinct photos (5 photos of 3 identities: 2 positive, 8 negative
    pairs), not on the 4 listed pairs, and its intervals resample the
    identities."""
    import torch

    from kdzoo.evaluation import FaceVerificationMetric
    out, _ = make_set(tmp_path)
    ds = InsightFaceBinDataset(out)
    ver = ds.metainfo['verification']['t']
    rng = np.random.default_rng(0)
    photo = rng.normal(size=(5, 8))  # one embedding per distinct photo
    metric = FaceVerificationMetric(fars=(0.1, ), min_false_accepts=1,
                                    bootstrap=50, num_folds=2)
    metric.dataset_meta = ds.metainfo
    metric.process(None, [dict(index=i, embedding=torch.from_numpy(
        photo[ver['image_ids'][i]].astype(np.float32)))
        for i in range(len(ds))])
    res = metric.evaluate(len(ds))
    assert res['t/num_positives'] == 2 and res['t/num_negatives'] == 8
    assert metric.bootstrap_info['t']['unit'] == 'identity'
    assert metric.bootstrap_info['t']['count'] == 3
    # brute force over the 10 pairs of distinct photos
    x = photo / np.linalg.norm(photo, axis=1, keepdims=True)
    ident = np.array([0, 0, 1, 1, 2])  # a1 a2 b1 b2 c1 (image_ids order)
    i, j = np.triu_indices(5, 1)
    from kdzoo.evaluation import roc_auc
    ref = roc_auc(np.sum(x[i] * x[j], 1), ident[i] == ident[j])
    assert res['t/roc_auc'] == pytest.approx(ref, abs=1e-4)  # 2^-15 bins
    assert 't/TAR@FAR=1e-1' not in res  # all-pairs sets: FAR <= 1e-2
