"""Our snapshots open in the official code (SPEC §2 and §7; issue 21, section 3).

A snapshot embeds the source of every module that defines one of its persistent classes, and the official code
(and every fork built on it) executes that source against its own tree. So the embedded modules may import and
call only the official surface of SPEC §7. Every kind of snapshot the project writes is made here by a real
(one-step) training run, then (a) its embedded sources are checked against that surface and (b) it is loaded and
run in a process whose code tree holds only stand-ins with the official names. Also: the public names that
third-party code imports keep the official signatures, and style_mixing.py writes the official PNGs.
"""

import ast
import ctypes
import glob
import importlib
import inspect
import json
import os
import pickle
import shutil
import subprocess
import sys

import click
import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner
from snapshot_probe import network_outputs
from test_legacy import make_snapshot
from test_legacy_adopt import official_format_pickle
from test_train_e2e import dataset_zip  # noqa: F401 (a fixture)

import dnnlib
import generate
import style_mixing
import train
from metrics import metric_utils
from training import augment, decoder, loss, networks, regularizers, snapshot_io
from training.regularizers.term import Regularizer

pytestmark = pytest.mark.usefixtures('one_thread')

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = os.path.join(REPO_ROOT, 'tests', 'snapshot_probe.py')
OFFICIAL_MIRROR = '/work/.mirror/NVlabs+stylegan2-ada-pytorch/repo'  # Where a by-hand check finds the release.

# ----------------------------------------------------------------------------
# SPEC §7: what an embedded module may import, and which attributes of those modules it may use.

ALLOWED_THIRD_PARTY = {'numpy', 'scipy.signal', 'torch'}
ALLOWED_OURS = {
    'torch_utils.misc': {'constant', 'suppress_tracer_warnings', 'assert_shape', 'profiled_function',
                         'InfiniteSampler', 'params_and_buffers', 'named_params_and_buffers',
                         'copy_params_and_buffers', 'ddp_sync', 'check_ddp_consistency', 'print_module_summary',
                         'nan_to_num', 'symbolic_assert'},
    'torch_utils.persistence': {'persistent_class', '_reconstruct_persistent_obj', 'import_hook', 'is_persistent',
                                '_version'},
    'torch_utils.training_stats': {'report', 'report0', 'Collector', 'init_multiprocessing'},
    'dnnlib': {'EasyDict', 'util', 'make_cache_dir_path'},
    'dnnlib.util': {'EasyDict', 'open_url', 'construct_class_by_name', 'call_func_by_name', 'format_time', 'Logger'},
    'torch_utils.ops.conv2d_resample': {'conv2d_resample'},
    'torch_utils.ops.upfirdn2d': {'setup_filter', 'upfirdn2d', 'filter2d', 'upsample2d', 'downsample2d'},
    'torch_utils.ops.bias_act': {'bias_act', 'activation_funcs'},
    'torch_utils.ops.fma': {'fma'},
    'torch_utils.ops.grid_sample_gradfix': {'grid_sample', 'enabled'},
    'torch_utils.ops.conv2d_gradfix': {'conv2d', 'conv_transpose2d', 'no_weight_gradients', 'enabled',
                                       'weight_gradients_disabled'},
}
# The keywords of the official functions (SPEC §2's table): a call with another keyword fails there.
OFFICIAL_KEYWORDS = {
    ('torch_utils.misc', 'constant'): {'value', 'shape', 'dtype', 'device', 'memory_format'},
    ('torch_utils.misc', 'assert_shape'): {'tensor', 'ref_shape'},
    ('torch_utils.ops.conv2d_resample', 'conv2d_resample'): {'x', 'w', 'f', 'up', 'down', 'padding', 'groups',
                                                              'flip_weight', 'flip_filter'},
    ('torch_utils.ops.upfirdn2d', 'setup_filter'): {'f', 'device', 'normalize', 'flip_filter', 'gain', 'separable'},
    ('torch_utils.ops.upfirdn2d', 'upfirdn2d'): {'x', 'f', 'up', 'down', 'padding', 'flip_filter', 'gain', 'impl'},
    ('torch_utils.ops.upfirdn2d', 'filter2d'): {'x', 'f', 'padding', 'flip_filter', 'gain', 'impl'},
    ('torch_utils.ops.upfirdn2d', 'upsample2d'): {'x', 'f', 'up', 'padding', 'flip_filter', 'gain', 'impl'},
    ('torch_utils.ops.upfirdn2d', 'downsample2d'): {'x', 'f', 'down', 'padding', 'flip_filter', 'gain', 'impl'},
    ('torch_utils.ops.bias_act', 'bias_act'): {'x', 'b', 'dim', 'act', 'alpha', 'gain', 'clamp', 'impl'},
    ('torch_utils.ops.fma', 'fma'): {'a', 'b', 'c'},
    ('torch_utils.ops.conv2d_gradfix', 'conv2d'): {'input', 'weight', 'bias', 'stride', 'padding', 'dilation',
                                                   'groups'},
    ('torch_utils.ops.conv2d_gradfix', 'conv_transpose2d'): {'input', 'weight', 'bias', 'stride', 'padding',
                                                             'output_padding', 'groups', 'dilation'},
    ('torch_utils.ops.grid_sample_gradfix', 'grid_sample'): {'input', 'grid'},
    ('torch_utils.training_stats', 'report'): {'name', 'value'},
    ('torch_utils.training_stats', 'report0'): {'name', 'value'},
    ('torch_utils.training_stats', 'Collector'): {'regex', 'keep_previous'},
}


def _import_problem(module: str) -> str:
    """'' if an embedded module may import `module`, else why not."""
    top = module.split('.')[0]
    if module in ALLOWED_OURS or module in ALLOWED_THIRD_PARTY or top in ('numpy', 'torch'):
        return ''
    if top in sys.stdlib_module_names and top not in ('torch_utils', 'dnnlib', 'training', 'metrics'):
        return ''
    return f'imports {module}, which is not in the official surface'


def surface_problems(source: str) -> list:
    """What in `source` (an embedded module) the official code would not provide: imports outside SPEC §7,
    attributes of our modules that the official ones lack, keywords their functions do not take."""
    tree = ast.parse(source)
    problems, aliases = _import_problems(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            module = _module_of(node.value, aliases)
            if module is not None and node.attr not in ALLOWED_OURS[module]:
                problems.append(f'line {node.lineno}: uses {module}.{node.attr}, which the official module lacks')
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            module = _module_of(node.func.value, aliases)
            keywords = OFFICIAL_KEYWORDS.get((module, node.func.attr), None)
            for keyword in node.keywords if keywords is not None else ():
                if keyword.arg is not None and keyword.arg not in keywords:
                    problems.append(f'line {node.lineno}: calls {module}.{node.func.attr} with {keyword.arg}=, '
                                    f'which the official function does not take')
    return problems


def _import_problems(tree: ast.AST) -> tuple:
    """(problems, aliases): the imports outside the surface, and local name -> dotted name of our modules."""
    problems, aliases = [], dict()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _import_problem(alias.name):
                    problems.append(f'line {node.lineno}: {_import_problem(alias.name)}')
                if alias.name in ALLOWED_OURS:
                    aliases[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                full = f'{node.module}.{alias.name}'
                if node.level:
                    problems.append(f'line {node.lineno}: a relative import')
                elif full in ALLOWED_OURS:
                    aliases[alias.asname or alias.name] = full
                elif node.module in ALLOWED_OURS:
                    if alias.name not in ALLOWED_OURS[node.module]:
                        problems.append(f'line {node.lineno}: imports {full}, which the official module lacks')
                elif _import_problem(node.module):
                    problems.append(f'line {node.lineno}: {_import_problem(node.module)}')
    return problems, aliases


def _module_of(node: ast.AST, aliases: dict):
    """The dotted module name an expression such as `misc` or `dnnlib.util` stands for, else None."""
    if isinstance(node, ast.Name):
        return aliases.get(node.id)
    if isinstance(node, ast.Attribute):
        parent = _module_of(node.value, aliases)
        if parent is not None and f'{parent}.{node.attr}' in ALLOWED_OURS:
            return f'{parent}.{node.attr}'
    return None


def test_the_surface_check_finds_what_the_official_code_lacks():
    # The regression of 2f080d2 and its relatives: each line would fail in the official tree.
    bad = {
        'from training.loss import STAT_SIGNS_REAL': 'training.loss',
        'from training.networks import Conv2dLayer': 'training.networks',
        'import training.networks': 'training.networks',
        'from torch_utils import misc\nmisc.named_tensors(x)': 'misc.named_tensors',
        'from torch_utils import training_stats\ntraining_stats.reset()': 'training_stats.reset',
        'from torch_utils.ops import upfirdn2d\nupfirdn2d.upfirdn2d(x, f, mode=1)': 'mode=',
        'import dnnlib\ndnnlib.util.get_obj_by_name("a")': 'dnnlib.util.get_obj_by_name',
        'from torch_utils.misc import get_device': 'torch_utils.misc.get_device',
        'from metrics import metric_main': 'metrics',
        'import click': 'click',
    }
    for source, culprit in bad.items():
        problems = surface_problems(source)
        assert len(problems) == 1 and culprit in problems[0], (source, problems)
    good = ('import math\nimport numpy as np\nimport scipy.signal\nimport torch\nimport dnnlib\n'
            'from torch_utils import misc, persistence\nfrom torch_utils.ops import bias_act\n'
            'misc.assert_shape(x, [1])\nbias_act.bias_act(x, b, act="lrelu", gain=1)\ndnnlib.util.EasyDict()\n'
            'bias_act.activation_funcs["lrelu"].def_gain\n')
    assert surface_problems(good) == []


def test_augment_spells_the_loss_statistic_the_same():
    assert augment.STAT_SIGNS_REAL == loss.STAT_SIGNS_REAL

# ----------------------------------------------------------------------------
# Every kind of snapshot, written by the training loop.


STEP_FLAGS = ['--cfg=cifar', '--cbase=256', '--cmax=16', '--map=2', '--batch=4', '--gpus=0', '--metrics=none',
              '--workers=0', '--kimg=0.004', '--tick=0.004', '--snap=1']
# Each --arch, the squeeze ablations, aug on and off, each --reg, conditional and not (the coverage test checks).
VARIANTS = {
    'orig-ada':                         ['--arch=orig', '--aug=ada'],
    'skip-noaug-ggdr-cond':             ['--arch=skip', '--aug=noaug', '--reg=ggdr', '--cond=1'],
    'resnet-ada-glead-cond':            ['--arch=resnet', '--aug=ada', '--reg=glead', '--glead-recon=mse',
                                         '--cond=1'],
    'squeeze-ada-cond':                 ['--arch=squeeze', '--aug=ada', '--cond=1'],
    'squeeze-noblend-noaug-glead':      ['--arch=squeeze', '--squeeze-noblend=1', '--aug=noaug', '--reg=glead',
                                         '--glead-recon=mse'],
    'squeeze-torgbconv0-ada-ggdr':      ['--arch=squeeze', '--squeeze-torgb=conv0', '--aug=ada', '--reg=ggdr'],
    'squeeze-torgbexcite-noaug-cond':   ['--arch=squeeze', '--squeeze-torgb=excite', '--aug=noaug', '--cond=1'],
}


def _flag_values(flag: str) -> set:
    prefix = flag + '='
    return {arg[len(prefix):] for flags in VARIANTS.values() for arg in flags if arg.startswith(prefix)}


def test_the_variants_cover_every_kind_of_snapshot():
    assert _flag_values('--arch') == set(networks.SYNTHESIS_BLOCKS)
    assert _flag_values('--squeeze-torgb') | {'squeeze'} == set(networks.SQUEEZE_TORGB_SOURCES)
    assert _flag_values('--squeeze-noblend') == {'1'}
    # Every regularizer that changes D (its decoder); the others add no network.
    changes_D = {name for name in regularizers.REGULARIZERS
                 if regularizers.regularizer_class(name).decoder.__func__ is not Regularizer.decoder.__func__}
    assert _flag_values('--reg') == changes_D
    assert {'ada', 'noaug'} <= _flag_values('--aug') and _flag_values('--cond') == {'1'}
    assert any('--cond=1' not in flags for flags in VARIANTS.values())


def _cli_options(argv: list) -> dict:
    """The options train.py's command line hands the option builder for `argv`: those given, parsed."""
    ctx = train.main.make_context('train.py', list(argv))
    default = click.core.ParameterSource.DEFAULT
    return {name: value for name, value in ctx.params.items()
            if ctx.get_parameter_source(name) != default and name not in ('outdir', 'dry_run')}


@pytest.fixture(scope='module')
def snapshots(dataset_zip, tmp_path_factory):  # noqa: F811 (the fixture imported above)
    """name -> path of the snapshot a one-step run of that variant wrote.

    The runs go through the official entry points (SPEC §7), as the official train.py and scripts built on it
    call them: setup_training_loop_kwargs with the options our command line parses, then subprocess_fn in this
    process. The image grids are 2x2 instead of up to 32x32 (their 2 x 1024 generated images were most of the
    time of a run); the snapshot comes from the training loop's save path as in any run.
    """
    root = tmp_path_factory.mktemp('variants')
    paths = dict()
    for name, flags in VARIANTS.items():
        run_desc, args = train.setup_training_loop_kwargs(**_cli_options([f'--data={dataset_zip}', *STEP_FLAGS,
                                                                           *flags]))
        assert 'run_dir' not in args  # As the official builder: the caller picks the directory.
        args.image_grid_max = (2, 2)
        args.run_dir = str(root / name / f'00000-{run_desc}')
        os.makedirs(args.run_dir)
        assert train.subprocess_fn(rank=0, args=args, temp_dir=str(root / name)) is None
        (pkl,) = glob.glob(os.path.join(args.run_dir, 'network-snapshot-*.pkl'))
        paths[name] = pkl
    return paths


def test_subprocess_fn_trains_what_setup_training_loop_kwargs_describes(snapshots):
    for name, pkl in snapshots.items():
        run_dir = os.path.dirname(pkl)
        assert os.path.basename(pkl) == 'network-snapshot-000000.004.pkl', name
        assert {'log.txt', 'stats.jsonl', 'reals.png', 'fakes_init.png', 'training-state.pt'} <= set(os.listdir(run_dir))
        with open(os.path.join(run_dir, 'stats.jsonl')) as f:
            (record,) = [json.loads(line) for line in f]
        assert record['Progress/kimg']['mean'] == pytest.approx(0.004), name
        assert PIL.Image.open(os.path.join(run_dir, 'reals.png')).size == (2 * 16, 2 * 16)


def test_setup_training_loop_kwargs_builds_the_tree_of_the_command_line(dataset_zip, tmp_path):  # noqa: F811
    for name, flags in VARIANTS.items():
        argv = [f'--data={dataset_zip}', *STEP_FLAGS, *flags]
        result = CliRunner().invoke(train.main, [f'--outdir={tmp_path}', *argv, '--dry-run'], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        printed = result.output.split('Training options:\n', 1)[1].split('\n\nOutput directory:', 1)[0]
        run_desc, args = train.setup_training_loop_kwargs(**_cli_options(argv))
        assert json.loads(json.dumps(args)) == json.loads(printed), name
        assert f'00000-{run_desc}\n' in result.output, name
    # The official keywords with the official values, positionally too; our own options by name; a typo is refused.
    run_desc, args = train.setup_training_loop_kwargs(0, 1, [], 7, dataset_zip, True, workers=0, arch='squeeze')
    assert run_desc == 'tiny-cond-auto1-squeeze-r8' and args.num_gpus == 1 and args.device_type == 'cpu'
    assert args.image_snapshot_ticks == 1 and args.random_seed == 7 and args.metrics == []
    with pytest.raises(TypeError, match='squeez_r'):
        train.setup_training_loop_kwargs(data=dataset_zip, gpus=0, squeez_r=4)
    with pytest.raises(train.UserError, match='--data'):
        train.setup_training_loop_kwargs(data=str(tmp_path / 'missing.zip'), gpus=0)


class _SourceCollector(pickle.Unpickler):
    """Reads a snapshot without executing its embedded source: every persistent object's meta is recorded."""

    def __init__(self, f):
        super().__init__(f)
        self.metas = []

    def find_class(self, module, name):
        if (module, name) == ('torch_utils.persistence', '_reconstruct_persistent_obj'):
            return self.metas.append
        return super().find_class(module, name)


def embedded_sources(path: str) -> dict:
    """class name -> module source, for every persistent object in the snapshot at `path`."""
    with open(path, 'rb') as f:
        collector = _SourceCollector(f)
        collector.load()
    assert collector.metas and all(meta['version'] == 6 and meta['type'] == 'class' for meta in collector.metas)
    return {meta['class_name']: meta['module_src'] for meta in collector.metas}


def test_embedded_sources_use_only_the_official_surface(snapshots):
    sources = dict()  # module source -> class names
    for path in snapshots.values():
        for class_name, source in embedded_sources(path).items():
            sources.setdefault(source, set()).add(class_name)
    # The collector sees what it should: G and D from networks.py, the pipe, the decoders of GGDR and GLeaD.
    expected = {inspect.getsource(module): module for module in (networks, augment, decoder)}
    assert set(sources) == set(expected)
    assert {'Generator', 'Discriminator', 'AugmentPipe', 'FeatureDecoder', 'GLeaDHeads'} <= set().union(*sources.values())
    problems = [f'{expected[source].__name__}: {problem}' for source in sources for problem in surface_problems(source)]
    assert problems == []


def _stand_in_tree(root) -> str:
    """A code tree with our dnnlib and torch_utils (the official code has both, with the SPEC §2 API) and a
    `training` package of empty stand-ins with the official module names; loss.py defines only what the
    official one defines."""
    root = str(root)
    for package in ('dnnlib', 'torch_utils'):
        shutil.copytree(os.path.join(REPO_ROOT, package), os.path.join(root, package),
                        ignore=shutil.ignore_patterns('__pycache__'))
    os.makedirs(os.path.join(root, 'training'))
    for name in ('__init__', 'networks', 'augment', 'dataset', 'training_loop'):
        with open(os.path.join(root, 'training', f'{name}.py'), 'w') as f:
            f.write('')
    with open(os.path.join(root, 'training', 'loss.py'), 'w') as f:
        f.write('class Loss:\n    pass\n\n\nclass StyleGAN2Loss(Loss):\n    pass\n')
    return root


def _official_export(root) -> str:
    if not os.path.isdir(OFFICIAL_MIRROR):
        pytest.skip(f'no copy of the official repository at {OFFICIAL_MIRROR} (the stand-in variant runs anyway)')
    archive = subprocess.run(['git', f'--git-dir={OFFICIAL_MIRROR}', 'archive', 'HEAD'], check=True,
                             capture_output=True).stdout
    os.makedirs(root)
    subprocess.run(['tar', '-x', '-C', str(root)], input=archive, check=True)
    return str(root)


@pytest.mark.parametrize('tree', ['stand-ins', 'official'])
def test_snapshots_run_where_only_the_official_names_exist(snapshots, tmp_path, tree):
    root = _stand_in_tree(tmp_path / 'tree') if tree == 'stand-ins' else _official_export(tmp_path / 'tree')
    out = tmp_path / 'outputs.pt'
    env = dict(os.environ, OMP_NUM_THREADS='1')
    result = subprocess.run([sys.executable, '-I', PROBE, root, REPO_ROOT, str(out), *snapshots.values()],
                            cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    theirs = torch.load(out, weights_only=True)
    for name, path in snapshots.items():
        with open(path, 'rb') as f:
            ours = network_outputs(snapshot_io.load_network_pkl(f))
        got = theirs[path]
        assert got.keys() == ours.keys(), name
        for key in ours:
            assert torch.equal(got[key], ours[key]), (name, key)
        assert ('augment_pipe' in ours) == ('--aug=ada' in VARIANTS[name])
        assert any(key.startswith('D/decode/') for key in ours) == any('--reg=' in f for f in VARIANTS[name])

# ----------------------------------------------------------------------------
# style_mixing.py writes the official script's PNGs.


def _official_style_mixing(G, row_seeds, col_seeds, col_styles, truncation_psi, outdir):
    """The official style_mixing.py's steps on a network with embedded (official-style) classes, forced to fp32
    as the CPU needs: all seeds in one batch in the order of a set of them, float64 z, the mapping without
    truncation, then w_avg + (w - w_avg) * psi; the unmixed images in that batch, each mix in a batch of one;
    uint8 by x * 127.5 + 128, clamped; PIL RGB PNGs and the grid."""
    all_seeds = list(set(row_seeds + col_seeds))
    all_z = np.stack([np.random.RandomState(seed).randn(G.z_dim) for seed in all_seeds])
    all_w = G.mapping(torch.from_numpy(all_z), None)
    all_w = G.mapping.w_avg + (all_w - G.mapping.w_avg) * truncation_psi
    w_of = dict(zip(all_seeds, all_w, strict=True))

    def uint8(img):
        return (img.permute(0, 2, 3, 1) * 127.5 + 128).clamp(0, 255).to(torch.uint8).numpy()

    images = {(s, s): im for s, im in zip(all_seeds, uint8(G.synthesis(all_w, noise_mode='const', force_fp32=True)),
                                          strict=True)}
    for row_seed in row_seeds:
        for col_seed in col_seeds:
            w = w_of[row_seed].clone()
            w[col_styles] = w_of[col_seed][col_styles]
            images[(row_seed, col_seed)] = uint8(G.synthesis(w[None], noise_mode='const', force_fp32=True))[0]
    os.makedirs(outdir)
    for (row_seed, col_seed), image in images.items():
        PIL.Image.fromarray(image, 'RGB').save(os.path.join(outdir, f'{row_seed}-{col_seed}.png'))
    size = G.img_resolution
    canvas = PIL.Image.new('RGB', (size * (len(col_seeds) + 1), size * (len(row_seeds) + 1)), 'black')
    for i, col_seed in enumerate(col_seeds):
        canvas.paste(PIL.Image.fromarray(images[(col_seed, col_seed)], 'RGB'), (size * (i + 1), 0))
    for j, row_seed in enumerate(row_seeds):
        canvas.paste(PIL.Image.fromarray(images[(row_seed, row_seed)], 'RGB'), (0, size * (j + 1)))
        for i, col_seed in enumerate(col_seeds):
            canvas.paste(PIL.Image.fromarray(images[(row_seed, col_seed)], 'RGB'), (size * (i + 1), size * (j + 1)))
    canvas.save(os.path.join(outdir, 'grid.png'))


@pytest.mark.parametrize('trunc', [1.0, 0.7])
@torch.no_grad()
def test_style_mixing_writes_the_official_pngs_byte_for_byte(tmp_path, trunc):
    # An official-format snapshot: its classes come from the pickle and compute fp16 blocks in float16 on the
    # CPU, so the official steps run them with force_fp32; style_mixing.py adopts them by default.
    pkl = tmp_path / 'official.pkl'
    pkl.write_bytes(official_format_pickle(make_snapshot(num_fp16_res=2)))
    rows, cols, styles = [85, 100, 75, 458, 1500], [55, 821, 1789, 293], [0, 1, 2]
    with open(pkl, 'rb') as f:
        G = pickle.load(f)['G_ema']
    _official_style_mixing(G, rows, cols, styles, trunc, str(tmp_path / 'official'))
    result = CliRunner().invoke(style_mixing.main, [f'--network={pkl}', '--rows=' + ','.join(map(str, rows)),
                                                    '--cols=' + ','.join(map(str, cols)), '--styles=0-2',
                                                    f'--trunc={trunc}', f'--outdir={tmp_path / "ours"}'])
    assert result.exit_code == 0, result.output
    names = sorted(os.listdir(tmp_path / 'official'))
    assert sorted(os.listdir(tmp_path / 'ours')) == names and len(names) == 5 * 4 + 9 + 1
    differ = [name for name in names
              if (tmp_path / 'ours' / name).read_bytes() != (tmp_path / 'official' / name).read_bytes()]
    assert differ == []

# ----------------------------------------------------------------------------
# Public names that third-party code imports (SPEC §7), with the official signatures read from the release.

REQUIRED = inspect.Parameter.empty
OFFICIAL_SIGNATURES = {
    'generate.num_range': dict(s=REQUIRED),
    'style_mixing.num_range': dict(s=REQUIRED),
    'style_mixing.generate_style_mix': dict(network_pkl=REQUIRED, row_seeds=REQUIRED, col_seeds=REQUIRED,
                                            col_styles=REQUIRED, truncation_psi=REQUIRED, noise_mode=REQUIRED,
                                            outdir=REQUIRED),
    'projector.project': dict(G=REQUIRED, target=REQUIRED, num_steps=1000, w_avg_samples=10000,
                              initial_learning_rate=0.1, initial_noise_factor=0.05, lr_rampdown_length=0.25,
                              lr_rampup_length=0.05, noise_ramp_length=0.75, regularize_noise_weight=1e5,
                              verbose=False, device=REQUIRED),
    'projector.run_projection': dict(network_pkl=REQUIRED, target_fname=REQUIRED, outdir=REQUIRED,
                                     save_video=REQUIRED, seed=REQUIRED, num_steps=REQUIRED),
    'legacy.load_network_pkl': dict(f=REQUIRED, force_fp16=False),
    'metrics.metric_utils.get_feature_detector_name': dict(url=REQUIRED),
    'dnnlib.util.ask_yes_no': dict(question=REQUIRED),
    'dnnlib.util.copy_files_and_create_dirs': dict(files=REQUIRED),
    'dnnlib.util.list_dir_recursively_with_ignore': dict(dir_path=REQUIRED, ignores=None, add_base_to_relative=False),
    'dnnlib.util.is_pickleable': dict(obj=REQUIRED),
    'dnnlib.util.get_module_dir_by_obj_name': dict(obj_name=REQUIRED),
    'dnnlib.util.is_top_level_function': dict(obj=REQUIRED),
    'dnnlib.util.get_dtype_and_ctype': dict(type_obj=REQUIRED),
    'dnnlib.util.tuple_product': dict(t=REQUIRED),
    'generate.generate_images': dict(network_pkl=REQUIRED, seeds=REQUIRED, truncation_psi=REQUIRED,
                                     noise_mode=REQUIRED, outdir=REQUIRED, class_idx=REQUIRED, projected_w=REQUIRED),
    'train.setup_training_loop_kwargs': dict(gpus=None, snap=None, metrics=None, seed=None, data=None, cond=None,
                                             subset=None, mirror=None, cfg=None, gamma=None, kimg=None, batch=None,
                                             aug=None, p=None, target=None, augpipe=None, resume=None, freezed=None,
                                             fp32=None, nhwc=None, allow_tf32=None, nobench=None, workers=None),
    'train.subprocess_fn': dict(rank=REQUIRED, args=REQUIRED, temp_dir=REQUIRED),
    'calc_metrics.subprocess_fn': dict(rank=REQUIRED, args=REQUIRED, temp_dir=REQUIRED),
    'metrics.perceptual_path_length.PPLSampler': dict(G=REQUIRED, G_kwargs=REQUIRED, epsilon=REQUIRED, space=REQUIRED,
                                                      sampling=REQUIRED, crop=REQUIRED, vgg16=REQUIRED),
    'training.augment.matrix': dict(rows=REQUIRED, device=None),
    'training.augment.translate2d': dict(tx=REQUIRED, ty=REQUIRED),
    'training.augment.translate3d': dict(tx=REQUIRED, ty=REQUIRED, tz=REQUIRED),
    'training.augment.scale2d': dict(sx=REQUIRED, sy=REQUIRED),
    'training.augment.scale3d': dict(sx=REQUIRED, sy=REQUIRED, sz=REQUIRED),
    'training.augment.rotate2d': dict(theta=REQUIRED),
    'training.augment.rotate3d': dict(v=REQUIRED, theta=REQUIRED),
    'training.augment.translate2d_inv': dict(tx=REQUIRED, ty=REQUIRED),
    'training.augment.scale2d_inv': dict(sx=REQUIRED, sy=REQUIRED),
    'training.augment.rotate2d_inv': dict(theta=REQUIRED),
}
# Official functions that take **kwargs and pass them on (the matrix helpers hand `device=` to matrix()).
OFFICIAL_VAR_KEYWORDS = {f'training.augment.{name}' for name in ('translate2d', 'translate3d', 'scale2d', 'scale3d',
                                                                 'rotate2d', 'rotate3d', 'translate2d_inv',
                                                                 'scale2d_inv', 'rotate2d_inv')}


def _public(name: str):
    module, attr = name.rsplit('.', 1)
    return getattr(importlib.import_module(module), attr)


@pytest.mark.parametrize('name', list(OFFICIAL_SIGNATURES))
def test_public_name_has_the_official_signature(name):
    obj = _public(name)
    is_command = isinstance(obj, click.Command)
    if is_command:
        # A click command: its options carry the official names, and its callback takes them as keywords.
        assert set(OFFICIAL_SIGNATURES[name]) <= {param.name for param in obj.params}
        obj = obj.callback
    params = inspect.signature(obj).parameters
    for param, default in OFFICIAL_SIGNATURES[name].items():
        assert param in params, (name, param)
        assert params[param].kind is not inspect.Parameter.VAR_KEYWORD
        if default is not REQUIRED:
            assert params[param].default == default, (name, param)
    extra = [p for p in params.values() if p.name not in OFFICIAL_SIGNATURES[name] and p.name != 'ctx']
    assert all(p.default is not REQUIRED or p.kind is inspect.Parameter.VAR_KEYWORD for p in extra), (name, extra)
    if not is_command:
        # Positional calls (torch.multiprocessing.spawn passes the rank first) need the official order.
        assert [p for p in params if p in OFFICIAL_SIGNATURES[name]] == list(OFFICIAL_SIGNATURES[name]), name
    has_var_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    assert has_var_keyword or name not in OFFICIAL_VAR_KEYWORDS, name


def test_public_helpers_do_what_the_official_ones_do(tmp_path):
    assert generate.num_range('1,2,5-7') == style_mixing.num_range('1,2,5-7') == [1, 2, 5, 6, 7]
    assert metric_utils.get_feature_detector_name('https://x/y/inception-2015-12-05.pt') == 'inception-2015-12-05'
    comma_list = train.CommaSeparatedList()
    assert comma_list.convert('a,b', None, None) == ['a', 'b'] and comma_list.convert('none', None, None) == []
    assert isinstance(comma_list, click.ParamType) and comma_list.convert('', None, None) == []
    assert dnnlib.util.tuple_product((2, 3, 4)) == 24 and dnnlib.util.tuple_product(()) == 1
    dtype, ctype = dnnlib.util.get_dtype_and_ctype('float32')
    assert dtype == np.float32 and ctype is ctypes.c_float
    assert dnnlib.util.get_dtype_and_ctype(ctypes.c_uint8)[0] == np.uint8
    assert dnnlib.util.is_pickleable([1, 'a']) and not dnnlib.util.is_pickleable(lambda: 0)
    assert dnnlib.util.is_top_level_function(generate.num_range) and not dnnlib.util.is_top_level_function(lambda: 0)
    assert dnnlib.util.get_module_dir_by_obj_name('training.networks.Generator') == os.path.dirname(networks.__file__)
    (tmp_path / 'src' / 'sub').mkdir(parents=True)
    (tmp_path / 'src' / 'a.py').write_text('a')
    (tmp_path / 'src' / 'sub' / 'b.py').write_text('b')
    (tmp_path / 'src' / 'sub' / 'c.pyc').write_text('c')
    files = dnnlib.util.list_dir_recursively_with_ignore(str(tmp_path / 'src'), ignores=['*.pyc'],
                                                         add_base_to_relative=True)
    assert sorted(rel for _, rel in files) == [os.path.join('src', 'a.py'), os.path.join('src', 'sub', 'b.py')]
    dnnlib.util.copy_files_and_create_dirs([(path, str(tmp_path / 'dst' / rel)) for path, rel in files])
    assert (tmp_path / 'dst' / 'src' / 'sub' / 'b.py').read_text() == 'b'
