"""generate.py and style_mixing.py: seed lists, images from seeds and projected latents, style mixing, errors."""

import pickle

import click
import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner
from test_legacy import make_generator  # Tiny generators with every tensor moved off its initial value.

import generate
import legacy
import projector
import style_mixing
from runner import sampling
from training import snapshot_io

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def G():
    return make_generator()


@pytest.fixture(scope='module')
def network_pkl(G, tmp_path_factory):
    path = tmp_path_factory.mktemp('net') / 'snapshot.pkl'
    path.write_bytes(pickle.dumps(dict(training_set_kwargs=None, G_ema=G)))
    return str(path)


@pytest.fixture(scope='module')
def conditional_pkl(tmp_path_factory):
    path = tmp_path_factory.mktemp('net') / 'conditional.pkl'
    path.write_bytes(pickle.dumps(dict(G_ema=make_generator(c_dim=4))))
    return str(path)


def run(command, args):
    return CliRunner().invoke(command, args)


def read_png(path):
    with PIL.Image.open(path) as image:
        return image.mode, np.asarray(image).copy()


# ----------------------------------------------------------------------------
# Where the shared helpers live.


SHARED_HELPERS = ['ADOPT_HELP', 'MAX_SEED', 'adopt_option', 'load_generator', 'make_label', 'parse_range',
                  'script_device', 'seed_to_z', 'seeds_callback', 'to_pil', 'to_uint8']


def test_shared_helpers_live_in_the_package_and_generate_reexports_them():
    # The scripts take them from runner.sampling; generate.<name> keeps working for outside code.
    for name in SHARED_HELPERS:
        assert getattr(generate, name) is getattr(sampling, name), name
        assert name in generate.__all__
    for script in (style_mixing, projector):
        imported = [name for name in SHARED_HELPERS if getattr(script, name, None) is getattr(sampling, name)]
        assert imported and 'generate' not in vars(script), script.__name__  # No script imports another.


def test_script_device_takes_a_torch_device_name(monkeypatch):
    # One process on one device, named as torch names it; the launcher's resolve_device is another contract.
    assert sampling.script_device('cpu') == torch.device('cpu')
    with pytest.raises(click.BadParameter, match='tpu9'):
        sampling.script_device('tpu9')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)  # A machine without CUDA, on any machine.
    assert sampling.script_device(None) == torch.device('cpu')
    with pytest.raises(click.BadParameter, match='"cuda:1" asks for CUDA, but this PyTorch sees no CUDA device'):
        sampling.script_device('cuda:1')


# ----------------------------------------------------------------------------
# Seed lists.


@pytest.mark.parametrize('text, expected', [
    ('0-3,7,10-12', [0, 1, 2, 3, 7, 10, 11, 12]),
    ('5', [5]),
    ('3-3', [3]),
    (' 1 , 2 - 3 ', [1, 2, 3]),
    ('9,1,9', [9, 1, 9]),
    ('4294967295', [4294967295]),
])
def test_parse_range(text, expected):
    assert generate.parse_range(text) == expected


@pytest.mark.parametrize('text', ['', ' ', 'a', '3-1', '1,,2', '-1', '1-', '1.5', '1-2-3', '0x10', None])
def test_parse_range_rejects_bad_syntax(text):
    with pytest.raises(click.BadParameter):
        generate.parse_range(text)


# ----------------------------------------------------------------------------
# generate.py


def test_render_images_uses_the_official_seed_convention(G):
    images = generate.render_images(G, [0, 1, 0], truncation_psi=0.7, noise_mode='const')
    assert len(images) == 3 and images[0].shape == (16, 16, 3) and images[0].dtype == np.uint8
    assert np.array_equal(images[0], images[2]) and not np.array_equal(images[0], images[1])
    z = torch.from_numpy(np.random.RandomState(1).randn(1, G.z_dim)).float()
    with torch.no_grad():
        img = G(z, torch.zeros([1, 0]), truncation_psi=0.7, noise_mode='const')
    expected = (img * 127.5 + 128).clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()
    assert np.array_equal(images[1], expected)


def test_render_images_label_checks():
    G = make_generator(c_dim=4)
    with pytest.raises(ValueError, match='conditional'):
        generate.render_images(G, [0])
    with pytest.raises(ValueError, match='classes 0 to 3'):
        generate.render_images(G, [0], class_idx=4)
    per_class = [generate.render_images(G, [0], class_idx=k)[0] for k in range(2)]
    assert not np.array_equal(per_class[0], per_class[1])
    with pytest.warns(UserWarning, match='unconditional'):
        generate.render_images(make_generator(), [0], class_idx=1)


def test_generate_cli_writes_one_png_per_seed(G, network_pkl, tmp_path):
    result = run(generate.main, ['--network', network_pkl, '--seeds', '0-1,5', '--trunc', '0.7',
                                 '--outdir', str(tmp_path / 'out'), '--device', 'cpu'])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['seed0000.png', 'seed0001.png', 'seed0005.png']
    mode, pixels = read_png(tmp_path / 'out' / 'seed0005.png')
    assert mode == 'RGB' and pixels.shape == (16, 16, 3)
    assert np.array_equal(pixels, generate.render_images(G, [5], truncation_psi=0.7)[0])


def test_generate_cli_reads_weights_only_files(G, network_pkl, tmp_path):
    snapshot_io.convert(network_pkl, str(tmp_path / 'snapshot.pt'))
    result = run(generate.main, ['--network', str(tmp_path / 'snapshot.pt'), '--seeds', '3',
                                 '--outdir', str(tmp_path / 'out')])
    assert result.exit_code == 0, result.output
    assert np.array_equal(read_png(tmp_path / 'out' / 'seed0003.png')[1], generate.render_images(G, [3])[0])


def test_generate_cli_grayscale_network_writes_l_mode(tmp_path):
    path = tmp_path / 'gray.pkl'
    path.write_bytes(pickle.dumps(dict(G_ema=make_generator(img_channels=1))))
    result = run(generate.main, ['--network', str(path), '--seeds', '2', '--outdir', str(tmp_path / 'out')])
    assert result.exit_code == 0, result.output
    mode, pixels = read_png(tmp_path / 'out' / 'seed0002.png')
    assert mode == 'L' and pixels.shape == (16, 16)


def test_generate_cli_conditional_network(conditional_pkl, network_pkl, tmp_path):
    out = str(tmp_path / 'out')
    result = run(generate.main, ['--network', conditional_pkl, '--seeds', '0', '--outdir', out])
    assert result.exit_code == 2 and '--class' in result.output and 'conditional' in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)

    result = run(generate.main, ['--network', conditional_pkl, '--seeds', '0', '--class', '4', '--outdir', out])
    assert result.exit_code == 2 and 'classes 0 to 3' in result.output

    result = run(generate.main, ['--network', conditional_pkl, '--seeds', '0', '--class', '3', '--outdir', out])
    assert result.exit_code == 0, result.output
    assert (tmp_path / 'out' / 'seed0000.png').is_file()

    result = run(generate.main, ['--network', network_pkl, '--seeds', '1', '--class', '2', '--outdir', out])
    assert result.exit_code == 0 and 'ignored' in result.output


def test_generate_cli_clear_errors(network_pkl, tmp_path):
    out = str(tmp_path / 'out')
    result = run(generate.main, ['--network', str(tmp_path / 'missing.pkl'), '--seeds', '0', '--outdir', out])
    assert result.exit_code == 1 and 'No such file' in result.output and 'missing.pkl' in result.output
    assert isinstance(result.exception, SystemExit)  # A click error, not a traceback.

    (tmp_path / 'notes.txt').write_text('not a network')
    result = run(generate.main, ['--network', str(tmp_path / 'notes.txt'), '--seeds', '0', '--outdir', out])
    assert result.exit_code == 1 and 'Not a network snapshot' in result.output

    result = run(generate.main, ['--network', network_pkl, '--seeds', '1-x', '--outdir', out])
    assert result.exit_code == 2 and '--seeds' in result.output

    result = run(generate.main, ['--network', network_pkl, '--outdir', out])
    assert result.exit_code == 2 and '--seeds is required' in result.output

    result = run(generate.main, ['--network', network_pkl, '--seeds', '4294967296', '--outdir', out])
    assert result.exit_code == 2 and 'at most' in result.output


def test_generate_cli_projected_w(G, network_pkl, tmp_path):
    with torch.no_grad():
        ws = G.mapping(torch.randn([2, G.z_dim], generator=torch.Generator().manual_seed(3)), None).numpy()
    np.savez(tmp_path / 'w.npz', w=ws)
    result = run(generate.main, ['--network', network_pkl, '--projected-w', str(tmp_path / 'w.npz'), '--seeds', '0',
                                 '--outdir', str(tmp_path / 'out')])
    assert result.exit_code == 0, result.output
    assert 'ignored' in result.output
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['proj00.png', 'proj01.png']
    with torch.no_grad():
        img = G.synthesis(torch.from_numpy(ws[1:2]), noise_mode='const')
    assert np.array_equal(read_png(tmp_path / 'out' / 'proj01.png')[1], generate.to_uint8(img)[0])

    np.savez(tmp_path / 'bad.npz', w=ws[:, :2])
    result = run(generate.main, ['--network', network_pkl, '--projected-w', str(tmp_path / 'bad.npz'),
                                 '--outdir', str(tmp_path / 'out2')])
    assert result.exit_code == 2 and f'[N, {G.num_ws}, {G.w_dim}]' in result.output
    np.savez(tmp_path / 'nokey.npz', latents=ws)
    result = run(generate.main, ['--network', network_pkl, '--projected-w', str(tmp_path / 'nokey.npz'),
                                 '--outdir', str(tmp_path / 'out2')])
    assert result.exit_code == 2 and 'no key "w" (it has: latents)' in result.output
    np.save(tmp_path / 'plain.npy', ws)
    result = run(generate.main, ['--network', network_pkl, '--projected-w', str(tmp_path / 'plain.npy'),
                                 '--outdir', str(tmp_path / 'out2')])
    assert result.exit_code == 2 and 'not an .npz archive' in result.output


# ----------------------------------------------------------------------------
# style_mixing.py


def test_style_mix_takes_the_listed_rows_from_the_column_seed(G):
    every_row = list(range(G.num_ws))
    images = style_mixing.style_mix(G, [1, 2], [3], every_row)
    assert set(images) == {(1, 1), (2, 2), (3, 3), (1, 3), (2, 3)}
    assert np.array_equal(images[(1, 3)], images[(3, 3)])  # All styles from the column: the column image.
    images = style_mixing.style_mix(G, [1], [3], [0, 1], truncation_psi=0.5)
    assert not np.array_equal(images[(1, 3)], images[(1, 1)]) and not np.array_equal(images[(1, 3)], images[(3, 3)])
    with torch.no_grad():
        ws = G.mapping(torch.cat([generate.seed_to_z(s, G.z_dim, 'cpu') for s in (1, 3)]), None, truncation_psi=0.5)
        w = ws[0].clone()
        w[[0, 1]] = ws[1][[0, 1]]
        expected = generate.to_uint8(G.synthesis(w.unsqueeze(0), noise_mode='const'))[0]
    assert np.array_equal(images[(1, 3)], expected)
    with pytest.raises(ValueError, match='out of range'):
        style_mixing.style_mix(G, [1], [3], [G.num_ws])


def test_style_mixing_cli(G, network_pkl, tmp_path):
    out = tmp_path / 'out'
    result = run(style_mixing.main, ['--network', network_pkl, '--rows', '85,100', '--cols', '55,821,1789',
                                     '--styles', '0-1', '--trunc', '0.7', '--outdir', str(out)])
    assert result.exit_code == 0, result.output
    names = {p.name for p in out.iterdir()}
    mixes = {f'{r}-{c}.png' for r in (85, 100) for c in (55, 821, 1789)}
    unmixed = {f'{s}-{s}.png' for s in (85, 100, 55, 821, 1789)}
    assert names == mixes | unmixed | {'grid.png'}
    with PIL.Image.open(out / 'grid.png') as grid:
        assert grid.size == (16 * 4, 16 * 3) and grid.mode == 'RGB'
        grid = np.asarray(grid)
    assert not grid[:16, :16].any()  # Empty corner.
    assert np.array_equal(grid[:16, 32:48], read_png(out / '821-821.png')[1])  # Column images on top.
    assert np.array_equal(grid[32:48, :16], read_png(out / '100-100.png')[1])  # Row images on the left.
    assert np.array_equal(grid[32:48, 48:64], read_png(out / '100-1789.png')[1])
    images = style_mixing.style_mix(G, [100], [1789], [0, 1], truncation_psi=0.7)
    assert np.array_equal(read_png(out / '100-1789.png')[1], images[(100, 1789)])


def test_style_mixing_cli_errors(network_pkl, conditional_pkl, tmp_path):
    out = str(tmp_path / 'out')
    result = run(style_mixing.main, ['--network', network_pkl, '--rows', '1', '--cols', '2', '--styles', '0-99',
                                     '--outdir', out])
    assert result.exit_code == 2 and 'out of range' in result.output and '--styles' in result.output
    result = run(style_mixing.main, ['--network', network_pkl, '--rows', 'x', '--cols', '2', '--outdir', out])
    assert result.exit_code == 2 and '--rows' in result.output
    result = run(style_mixing.main, ['--network', conditional_pkl, '--rows', '1', '--cols', '2', '--styles', '0',
                                     '--outdir', out])
    assert result.exit_code == 2 and '--class' in result.output
    result = run(style_mixing.main, ['--network', conditional_pkl, '--rows', '1', '--cols', '2', '--styles', '0',
                                     '--class', '1', '--outdir', out])
    assert result.exit_code == 0, result.output
    result = run(style_mixing.main, ['--network', str(tmp_path / 'missing.pkl'), '--rows', '1', '--cols', '2',
                                     '--outdir', out])
    assert result.exit_code == 1 and 'No such file' in result.output


@pytest.mark.parametrize('command', [generate.main, style_mixing.main, legacy.convert_network_pickle])
def test_help_ends_with_examples_as_written(command):
    text = CliRunner().invoke(command, ['--help']).output
    examples = text[text.index('\n  Examples:\n'):]
    assert text.rstrip().endswith(examples.rstrip()) and '--help' not in examples
    lines = [line for line in examples.splitlines() if line.strip().startswith('python ')]
    assert len(lines) >= 2 and all(line.startswith('    python ') for line in lines)  # Kept, not re-wrapped.
